"""GPU memory figures: CPU gives zeros; rows carry all three FLARE-relevant fields."""

from common.core.gpu_memory import MEMORY_FIELDS, GpuMemory, reset_peak, snapshot


def test_cpu_snapshot_is_zero_and_row_has_all_fields():
    reset_peak("cpu")
    row = snapshot("cpu").as_row()
    assert tuple(row) == MEMORY_FIELDS
    assert all(value == 0.0 for value in row.values())


def test_max_is_fieldwise():
    a = GpuMemory(100.0, 300.0, 900.0)
    b = GpuMemory(200.0, 250.0, 950.0)
    assert a.max(b) == GpuMemory(200.0, 300.0, 950.0)
    assert GpuMemory(1.26, 2.0, 3.0).as_row()["gpu_alloc_peak_mb"] == 1.3
