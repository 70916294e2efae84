"""benchmarks/kernel_speed.py's tables from a result (no GPU: the rendering of a run's JSON)."""

from bench_scripts import load

kernel_speed = load("kernel_speed")


def tenants_result(by_bank: dict | None) -> dict:
    mt = {"tenants": 16, "bytes": 8e9, "batched": 20.0, "separate": 70.0, "base_ms": 5.0, "base_bytes": 10e9}
    if by_bank is not None:
        mt["by_bank"] = by_bank
    return {"kernel_path": "jit", "rows": {}, "multi_tenant": mt}


def test_multi_tenant_line_gives_the_byte_floor_ratio():
    text = kernel_speed.render(tenants_result(None))
    # 8 GB at the base's 10 GB in 5 ms: a 4 ms floor
    assert "one launch per matrix 20.000 ms; 16 separate calls 70.000 ms (5.00x the byte floor" in text
    assert "alone" not in text  # results written before the banks were timed alone


def test_multi_tenant_banks_alone_each_against_its_own_floor():
    by_bank = {"q": {"ms": 1.0, "bytes": 1e9}, "down": {"ms": 3.0, "bytes": 2e9}}
    text = kernel_speed.render(tenants_result(by_bank))
    line = next(ln for ln in text.splitlines() if ln.startswith("one matrix's banks alone"))
    assert line.endswith("q 1.000 ms (2.00x its floor); down 3.000 ms (3.00x its floor)")
