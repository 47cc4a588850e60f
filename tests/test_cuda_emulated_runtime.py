"""The emulated device itself (csrc/emulation), on the small kernels of
tests/emulated/controls.cpp: it follows the device's semantics (thread
indices, barriers, warp collectives, atomics, dynamic shared memory, warps
that really run at the same time), and it catches the bugs it exists to
catch, each shown by a deliberately broken kernel (the negative controls)."""
import re
import time

import pytest
import torch

pytestmark = pytest.mark.cuda_emulated


# ------------------------------------------------------------ semantics
@pytest.mark.parametrize("grid,block", [([3, 2, 2], [5, 3, 2]), ([1, 1, 1], [33, 1, 1]), ([4, 1, 1], [1024, 1, 1])])
def test_thread_and_block_indices(emulated, grid, block):
    out = emulated.control_indices(grid, block)
    seen = {tuple(r) for r in out.tolist()}
    want = {(tx, ty, tz, bx, by, bz, *block, *grid)
            for bx in range(grid[0]) for by in range(grid[1]) for bz in range(grid[2])
            for tx in range(block[0]) for ty in range(block[1]) for tz in range(block[2])}
    assert seen == want  # every thread ran once, with the device's coordinates


def test_barrier_orders_shared_memory(emulated):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))  # 8 blocks, the last partial
    sums = emulated.control_block_sum(x, True)
    torch.testing.assert_close(sums, torch.nn.functional.pad(x, (0, 24)).view(8, 128).sum(1), rtol=1e-5, atol=1e-5)
    x = torch.randn(128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(emulated.control_reuse(x, True), x.roll(-1) + 2 * x.roll(-1))


def test_warp_collectives_follow_the_device(emulated):
    x = torch.randint(-20, 100, (96,), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    out = emulated.control_collectives(x)
    lane = torch.arange(96) % 32
    warp = torch.arange(96) // 32 * 32
    v = x.long()
    # shfl: lane (5 l + 3) % 32; up 3 / down 5: own value where the source is outside the warp
    assert out[:, 0].tolist() == v[warp + (lane * 5 + 3) % 32].tolist()
    assert out[:, 1].tolist() == torch.where(lane >= 3, v[(torch.arange(96) - 3).clamp(min=0)], v).tolist()
    assert out[:, 2].tolist() == torch.where(lane + 5 < 32, v[(torch.arange(96) + 5).clamp(max=95)], v).tolist()
    assert out[:, 3].tolist() == v[warp + (lane ^ 6)].tolist()
    # width 8: lane 2 of each group of 8; down 3 stays within the group
    group = torch.arange(96) // 8 * 8
    assert out[:, 4].tolist() == v[group + 2].tolist()
    in_group = torch.arange(96) % 8
    assert out[:, 5].tolist() == torch.where(in_group + 3 < 8, v[(torch.arange(96) + 3).clamp(max=95)], v).tolist()
    for w in range(3):
        bits = sum(int(v[32 * w + i] & 1) << i for i in range(32))
        assert {int(b) & 0xFFFFFFFF for b in out[32 * w: 32 * w + 32, 6]} == {bits}
        assert set(out[32 * w: 32 * w + 32, 7].tolist()) == {int(bool((v[32 * w: 32 * w + 32] > 50).any()))}
        assert set(out[32 * w: 32 * w + 32, 8].tolist()) == {int(bool((v[32 * w: 32 * w + 32] >= 0).all()))}


def test_warp_sum_and_atomics(emulated):
    x = torch.randn(128, generator=torch.Generator().manual_seed(3))
    out = emulated.control_warp_sum(x, 0)
    torch.testing.assert_close(out, x.view(4, 32).sum(1).repeat_interleave(32), rtol=1e-5, atol=1e-5)
    values = torch.randint(0, 17, (5000,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(emulated.control_histogram(values, 17), torch.bincount(values, minlength=17))


def test_warps_of_a_block_run_at_the_same_time(emulated):
    # warp 1 spins until warp 0 sets a flag, with no barrier between them:
    # an emulator that ran one warp after the other would hang (and report it)
    assert emulated.control_handshake() == 1


def test_dynamic_shared_memory_and_its_opt_in(emulated):
    out = emulated.control_launch(3, [256, 1, 1], 256 * 4, False)
    assert out.tolist() == [float(256 * b + 255 - t) for b in range(3) for t in range(256)]
    big = 100 * 1024  # above the default 48 KiB: refused, then allowed once requested
    with pytest.raises(RuntimeError, match="requests 102400 bytes of dynamic shared memory, above its limit of 49152"):
        emulated.control_launch(2, [64, 1, 1], big, False)
    out = emulated.control_launch(2, [64, 1, 1], big, True)
    assert out.tolist() == [float(64 * b + 63 - t) for b in range(2) for t in range(64)]
    with pytest.raises(RuntimeError, match="at most 232448 bytes"):
        emulated.control_launch(2, [64, 1, 1], 233 * 1024, True)


def test_shared_memory_atomics(emulated):
    # atomics of different threads on one shared word do not race; the read
    # after the barrier sees all of them
    assert emulated.control_shared_atomic(96, True).item() == 96 * 97 / 2


def test_launches_are_counted_by_kernel(emulated):
    before = emulated.control_launch_count("histogram_kernel")
    emulated.control_histogram(torch.zeros(10, dtype=torch.long), 1)
    assert emulated.control_launch_count("histogram_kernel") == before + 1
    assert emulated.control_launch_count("no_such_kernel") == 0


# ------------------------------------------------------------ negative controls
def test_catches_a_missing_syncthreads_before_a_shared_read(emulated):
    x = torch.randn(300)
    with pytest.raises(RuntimeError, match=r"block_sum_kernel.*reads values .*(no thread of the block has written|"
                                           r"with no barrier between them)"):
        emulated.control_block_sum(x, False)


def test_catches_a_plain_read_racing_shared_atomics(emulated):
    with pytest.raises(RuntimeError, match=r"shared_atomic_kernel.*(reads total .*with no barrier between them|"
                                           r"atomically updates total .*a plain read races the atomic)"):
        emulated.control_shared_atomic(64, False)


def test_catches_a_missing_syncthreads_before_a_shared_buffer_is_reused(emulated):
    with pytest.raises(RuntimeError, match=r"reuse_kernel.*writes buffer .*read with no barrier since"):
        emulated.control_reuse(torch.randn(128), False)


def test_catches_a_wrong_shuffle_offset(emulated):
    x = torch.randn(128, generator=torch.Generator().manual_seed(5))
    # the butterfly that starts at offset 8 sums each half of the warp, as a
    # GPU would: the emulated lanes exchange exactly the device's values
    out = emulated.control_warp_sum(x, 1)
    torch.testing.assert_close(out, x.view(8, 16).sum(1).repeat_interleave(16), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, emulated.control_warp_sum(x, 0))
    # a shuffle that reads lanes outside its mask: undefined on the device, an error here
    with pytest.raises(RuntimeError, match=r"__shfl_down_sync reads lane 16, which is not in the mask"):
        emulated.control_warp_sum(x, 2)


@pytest.mark.parametrize("shift", [1, 5])
def test_catches_an_out_of_bounds_shared_index(emulated, shift):
    # the first thread past the end is reported (128 .. 127 + shift)
    with pytest.raises(RuntimeError, match=r"index 1(2[89]|3[0-2]) is out of bounds of shared values \(extent 128\)"):
        emulated.control_shared_index(torch.randn(128), shift)
    out = emulated.control_shared_index(torch.arange(128.0), 0)
    assert out.tolist() == list(range(127, -1, -1))


@pytest.mark.parametrize("block,message", [
    ([1025, 1, 1], r"invalid configuration argument: bounded_kernel launched with block \(1025, 1, 1\)"),
    ([32, 32, 2], r"invalid configuration argument: bounded_kernel launched with 2048 threads per block"),
    ([16, 1, 65], r"block \(16, 1, 65\) \(dimension 2 must be in \[1, 64\]\)"),
    ([0, 1, 1], r"block \(0, 1, 1\) \(dimension 0 must be in \[1, 1024\]\)"),
    ([512, 1, 1], r"too many resources requested for launch: bounded_kernel has __launch_bounds__\(256\) and was "
                  r"launched with 512 threads per block"),
])
def test_refuses_a_launch_over_the_limits(emulated, block, message):
    with pytest.raises(RuntimeError, match=message):
        emulated.control_launch(1, block, 0, False)
    assert emulated.control_launch(3, [256, 1, 1], 0, False).item() == 3  # at the limit: it runs
    with pytest.raises(RuntimeError, match=r"grid \(0, 1, 1\)"):
        emulated.control_launch(0, [32, 1, 1], 0, False)


def test_reports_a_barrier_that_exited_threads_never_reach(emulated):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"__syncthreads is never reached by the 1 warp\(s\) that exited"):
        emulated.control_deadlock(0, 30.0)
    assert time.monotonic() - start < 10  # found at once, not by the timeout


def test_reports_a_deadlock_after_the_timeout(emulated):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"deadlock: warp 0 waited 0.5 s at __syncthreads; 1 of 2 warps arrived"):
        emulated.control_deadlock(1, 0.5)
    assert 0.4 < time.monotonic() - start < 20
    # the spinning warp was stopped: the device works on
    assert emulated.control_handshake() == 1


def test_reports_a_collective_that_waits_for_lanes_at_a_barrier(emulated):
    with pytest.raises(RuntimeError, match=r"__shfl_xor_sync\(mask 0xffffffff\): lane 16 of the mask at "
                                           r"__syncthreads \(deadlock or divergent collective\)"):
        emulated.control_deadlock(2, 30.0)


def test_kernel_assert_raises(emulated):
    emulated.control_kernel_assert(torch.arange(100))
    with pytest.raises(RuntimeError, match=re.escape('thread (2, 0, 0): CUDA_KERNEL_ASSERT(x[i] >= 0 && "values '
                                                     'must be non-negative") failed')):
        emulated.control_kernel_assert(torch.tensor([1, 2, -3]))
