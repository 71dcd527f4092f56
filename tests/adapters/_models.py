"""Small models with the module layouts the adapters meet in the wild."""
from torch import nn


class LlamaMLP(nn.Module):
    """The HF LLaMA MLP's layout (gate_proj, up_proj, down_proj, act_fn)."""

    def __init__(self, d=16, h=40):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj, self.act_fn = nn.Linear(h, d, bias=False), nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
