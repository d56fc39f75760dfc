"""The llama-server that scripts/setup built uses no CPU feature the kernel does not offer.

A native build crashed at its first computation on an Intel Xeon with AMX under KVM:
AMX needs a grant the kernel gives each process, which a hypervisor may refuse although
the CPU lists AMX. So the build must hold no AMX instruction at all, and AVX-512 ones
only where /proc/cpuinfo (what the kernel enabled) lists AVX-512.
"""

import os
import re
import shutil
import subprocess

import pytest

from bioproxy import llamacpp
from tests.servers import ROOT

AMX = re.compile(r"\s(tdpb[a-z]+|tdpfp16ps|tileloadd\w*|ldtilecfg|sttilecfg|tilestored|tilezero)\s")


def disassembly():
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.fail("objdump is missing (binutils, with build-essential)", pytrace=False)
    library = os.path.join(os.path.dirname(llamacpp.binary_path()), "libggml-cpu.so")
    run = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", library],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return run.stdout


def test_the_build_holds_no_amx_and_avx_512_only_where_the_kernel_offers_it():
    code = disassembly()
    assert "vfmadd" in code  # the CPU kernels are there (AVX2's FMA at least)
    assert AMX.search(code) is None, AMX.search(code)
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    if "avx512f" not in flags:
        assert "zmm" not in code
    else:
        assert "zmm" in code  # and used where it is offered: it doubles generation speed


@pytest.mark.parametrize("flags", [[], ["--dev"]])
def test_setup_once_done_touches_no_package_index(flags):
    # scripts/run calls scripts/setup on every start: it used to run pip each time (4-11 s).
    environ = {**os.environ, "PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/"}
    run = subprocess.run(
        [os.path.join(ROOT, "scripts", "setup"), *flags],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == "==> Setup done\n", run.stdout
