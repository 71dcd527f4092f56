"""Runnable Lightning recipes: ``python -m moemix.recipes.NAME {fit,validate,test,predict}``."""
