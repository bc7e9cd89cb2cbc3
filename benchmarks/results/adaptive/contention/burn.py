"""A one-thread matmul loop for N seconds: stands in for a trainer busy on the other core."""

import sys
import time

import torch

torch.set_num_threads(1)
a = torch.randn(256, 768)
w = torch.randn(768, 2048)
t_end = time.time() + float(sys.argv[1])
while time.time() < t_end:
    (a @ w).relu_().sum()
