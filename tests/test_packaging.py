"""The distribution: a wheel builds, carries the import hook (doublesqueeze.pth + dsq_autohook) and the extras,
and installed into a fresh virtual environment it switches DeepSpeed on by the config section alone, with nothing
of the working tree importable."""
import os
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from .conftest import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(out)], check=True, capture_output=True, text=True)
    (path,) = out.glob("doublesqueeze-*.whl")
    return path


def test_wheel_has_the_hook_and_the_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        pth = z.read("doublesqueeze.pth").decode()
    assert "doublesqueeze.pth" in names and "dsq_autohook.py" in names
    assert pth.strip() == "import dsq_autohook"
    assert {"dsq_plugins/engine/bucket.py", "deepspeed_ext/autopatch.py", "horovod_ext/autopatch.py"} <= names
    extras = set(meta.get_all("Provides-Extra"))
    assert {"deepspeed", "horovod", "lightning", "transformers", "async", "test"} <= extras
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("deepspeed") and 'extra == "deepspeed"' in r for r in requires)
    assert any(r.startswith("lightning") and 'extra == "lightning"' in r for r in requires)
    assert any(r.startswith("transformers") and 'extra == "transformers"' in r for r in requires)


def test_installed_wheel_switches_deepspeed_on_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies (torch, deepspeed...) come from this environment's site-packages, after the venv's own
    (purelib / "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = ("import dsq_autohook, deepspeed, deepspeed_ext, pathlib; "
             "assert deepspeed._dsq_original_initialize is not None; "
             "print(pathlib.Path(dsq_autohook.__file__).parent, pathlib.Path(deepspeed_ext.__file__).parent.parent)")
    out = subprocess.run([str(py), "-c", check], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    hook_dir, ext_dir = out.stdout.splitlines()[-1].split()        # DeepSpeed prints its own lines first
    assert Path(hook_dir) == purelib and Path(ext_dir) == purelib        # the installed copy, not the tree
    off = subprocess.run([str(py), "-c", "import deepspeed; print(hasattr(deepspeed, '_dsq_original_initialize'))"],
                         cwd=tmp_path, env=dict(env, DSQ_AUTOHOOK="0"), check=True, capture_output=True, text=True)
    assert off.stdout.split()[-1] == "False"
