"""The post's network as a user would write it in plain PyTorch: the reference the benchmarks
compare fmnist against."""

import torch
import torch.nn.functional as F
from torch import nn


class PlainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(7 * 7 * 64, 1024)
        self.fc2 = nn.Linear(1024, 10)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)

    def load_fmnist_post(self, state: dict) -> "PlainNet":
        """Take the weights of fmnist's `post` model (which flattens in H, W, C order)."""
        fc1 = state["fc1.weight"].view(1024, 7, 7, 64).permute(0, 3, 1, 2).reshape(1024, -1)
        mapping = {"out.weight": "fc2.weight", "out.bias": "fc2.bias"}
        self.load_state_dict({mapping.get(k, k): (fc1 if k == "fc1.weight" else v) for k, v in state.items()})
        return self
