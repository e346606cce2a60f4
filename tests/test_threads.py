"""Thread counts follow the CPUs a process may use, and torch's threads wait passively (issue 26).

The wait policy is read by libgomp once, when torch loads: these tests check it is in the
environment at that moment for every entry point, in a fresh interpreter each.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from facesearch.threads import check_fixed_threads, usable_cpus, use_usable_cpus

# Records OMP_WAIT_POLICY as it is when torch is first imported, then imports argv's modules in order.
PROBE = """
import importlib, json, os, sys
seen = {}
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("OMP_WAIT_POLICY")
sys.meta_path.insert(0, Probe())
for module in sys.argv[1:]:
    importlib.import_module(module)
print(json.dumps(seen))
"""


def policy_when_torch_loads(repo_root, modules: list[str], **env: str) -> str | None:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=repo_root, env={**base, **env},
                         capture_output=True, text=True, check=True)  # fmt: skip
    seen = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert "torch" in seen, f"{modules} did not import torch"
    return seen["torch"]


@pytest.mark.parametrize(
    "modules",
    [
        ["stages.train"],  # python -m stages.<name>: the stages package first
        ["stages.embed"],
        ["facesearch.tools.cli"],  # python -m facesearch
        ["cv2", "numpy", "streamlit", "facesearch.gallery.app_core"],  # app/main.py's order of imports
    ],
)
def test_every_entry_point_sets_passive_waiting_before_torch_loads(repo_root, modules):
    assert policy_when_torch_loads(repo_root, modules) == "PASSIVE"


def test_a_policy_the_user_chose_is_kept(repo_root):
    assert policy_when_torch_loads(repo_root, ["stages.train"], OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    # libgomp's spin count overrides any policy: the package then leaves the policy alone.
    assert policy_when_torch_loads(repo_root, ["stages.train"], GOMP_SPINCOUNT="10000") is None


def test_bench_scripts_import_facesearch_before_torch(repo_root):
    for script in sorted((repo_root / "bench").glob("*.py")):
        if script.name == "contention.py":  # its "before" variant loads torch first on purpose
            continue
        text = script.read_text()
        torch_at = re.search(r"^\s*import torch\b", text, re.MULTILINE)
        if torch_at is None:
            continue
        package_at = re.search(r"^\s*import facesearch\b", text, re.MULTILINE)
        assert package_at is not None and package_at.start() < torch_at.start(), script.name


def test_inference_uses_the_cpus_this_process_may_use():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if usable_cpus() > 1 else 2)
        assert use_usable_cpus() == usable_cpus() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == usable_cpus()
    finally:
        torch.set_num_threads(before)


def test_a_fixed_thread_count_above_the_cpus_warns(caplog):
    check_fixed_threads(usable_cpus(), "training")
    assert not caplog.records
    check_fixed_threads(usable_cpus() + 1, "training")
    assert "same result" in caplog.text
