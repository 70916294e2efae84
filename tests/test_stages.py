"""The pipeline's stages are observable through deltacomp.stages (what the benchmarks time)."""

import threading

from deltacomp.compress import compress
from deltacomp.config import CompressConfig
from deltacomp.stages import observe, stage


class Recorder:
    def __init__(self):
        self.events, self.lock = [], threading.Lock()

    def enter(self, name):
        with self.lock:
            self.events.append(("enter", name))

    def exit(self, name):
        with self.lock:
            self.events.append(("exit", name))


def test_a_compression_reports_its_stages(llama_pair, tmp_path):
    base, ft, _ = llama_pair
    with observe(Recorder()) as rec:
        compress(base, ft, tmp_path / "pkg", CompressConfig(bits=1.0), progress=False)
    entered = {name for kind, name in rec.events if kind == "enter"}
    assert {"load", "svd", "rtn", "pack", "write"} <= entered
    assert sum(k == "enter" for k, _ in rec.events) == sum(k == "exit" for k, _ in rec.events)


def test_nothing_is_reported_without_a_listener_and_a_listener_leaves():
    rec = Recorder()
    with stage("svd"):
        pass
    with observe(rec):
        with stage("svd"):
            pass
    with stage("svd"):
        pass
    assert rec.events == [("enter", "svd"), ("exit", "svd")]
