import platform
import resource

import pytest
import torch

from fmnist.device import keep_freed_memory


def page_faults_of_fresh_tensors(rounds: int, nbytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.ones(nbytes // 4)  # allocated, written and freed, as a step's activations are
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")
def test_freed_memory_is_reused_without_page_faults():
    assert keep_freed_memory()
    page_faults_of_fresh_tensors(2, 20 << 20)  # the heap grows once
    pages_per_round = (20 << 20) // resource.getpagesize()
    # By default glibc maps each such block afresh: every round faults in all of its pages.
    assert page_faults_of_fresh_tensors(20, 20 << 20) < pages_per_round
