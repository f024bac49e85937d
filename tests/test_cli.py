"""`moec compile` as users run it: real subprocesses, exit codes, clear errors, nothing half-written."""

import os
import subprocess
import sys
import textwrap

import pytest

from moec.errors import (OutputExistsError, SourceError, UnsupportedOpError)


def moec(*args, cwd=None, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [cwd, os.environ.get("PYTHONPATH")])))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "moec.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.fixture
def userpkg(tmp_path):
    """A user's own package with factories of every kind."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from moec import zoo

        def tiny_moe():
            torch.manual_seed(0)
            m = zoo.Residual(zoo.LoopMoE(hidden=16, inter=24, num_experts=4, top_k=2), 16).eval()
            x = torch.randn(2, 6, 16)
            dyn = ({0: torch.export.Dim("batch", min=1, max=32), 1: torch.export.Dim("seq", min=2, max=512)},)
            return m, (x,), dyn

        def dense_mlp():
            m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()
            return m, (torch.randn(3, 8),)

        def broken():
            raise RuntimeError("weights file missing")

        def wrong_type():
            return 42

        class Fancy(nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = nn.Linear(8, 8)

            def forward(self, x):
                return torch.special.bessel_j0(self.proj(x))  # no ONNX translation

        class Wrapper(nn.Module):
            def __init__(self):
                super().__init__()
                self.block = Fancy()

            def forward(self, x):
                return self.block(x)

        def unsupported():
            return Wrapper().eval(), (torch.randn(2, 8),)
    '''))
    return str(tmp_path)


def test_compile_demo_with_no_source(tmp_path):
    out = tmp_path / "demo"
    r = moec("compile", "--out", str(out), "--triton-repo", str(tmp_path / "repo"), "--model-name", "demo",
             cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "4 fused, 0 unfused" in r.stdout and "PASS" in r.stdout and str(out) in r.stdout
    assert (out / "model.onnx").exists() and (out / "report.json").exists() and (out / "golden").is_dir()
    assert (tmp_path / "repo" / "demo" / "1" / "model.onnx").exists()
    assert "[" in r.stderr and "capturing" in r.stderr  # progress lines


def test_factory_source_and_existing_output(userpkg, tmp_path):
    out = str(tmp_path / "a")
    r = moec("compile", "userpkg.models:tiny_moe", "--out", out, "--quiet", cwd=userpkg)
    assert r.returncode == 0, r.stderr
    before = open(os.path.join(out, "model.onnx"), "rb").read()
    r2 = moec("compile", "userpkg.models:tiny_moe", "--out", out, "--quiet", cwd=userpkg)
    assert r2.returncode == OutputExistsError.exit_code and "already exists" in r2.stderr and "--force" in r2.stderr
    assert open(os.path.join(out, "model.onnx"), "rb").read() == before
    r3 = moec("compile", "userpkg.models:tiny_moe", "--out", out, "--quiet", "--force", cwd=userpkg)
    assert r3.returncode == 0, r3.stderr
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".moec-tmp")]


def test_non_moe_model_still_compiles(userpkg, tmp_path):
    r = moec("compile", "userpkg.models:dense_mlp", "--out", str(tmp_path / "d"), "--quiet", cwd=userpkg)
    assert r.returncode == 0, r.stderr
    assert "no MoE layer found" in r.stdout


@pytest.mark.parametrize("source,code,words", [
    ("nosuchpkg.models:f", SourceError.exit_code, ["cannot import module 'nosuchpkg.models'"]),
    ("userpkg.models:nope", SourceError.exit_code, ["has no callable 'nope'"]),
    ("userpkg.models:broken", SourceError.exit_code, ["raised RuntimeError: weights file missing"]),
    ("userpkg.models:wrong_type", SourceError.exit_code, ["returned int"]),
    ("userpkg.models:unsupported", UnsupportedOpError.exit_code, ["block (Fancy)", "bessel_j0", "no ONNX translation"]),
    ("not-a-source", SourceError.exit_code, ["cannot interpret SOURCE"]),
])
def test_bad_sources_fail_clearly(userpkg, tmp_path, source, code, words):
    out = tmp_path / "x"
    r = moec("compile", source, "--out", str(out), "--quiet", cwd=userpkg)
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    for w in words:
        assert w in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith("moec: error:") and "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".moec-tmp")]


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"this is not a zip archive")
    r = moec("compile", str(bad), "--out", str(tmp_path / "x"), "--quiet")
    assert r.returncode == SourceError.exit_code
    assert "cannot read" in r.stderr and "model.pt2" in r.stderr


def test_hf_directory_without_weights(tmp_path):
    from moec import zoo

    model = zoo.build_hf_model("mixtral")
    model.config.save_pretrained(tmp_path / "hf")
    r = moec("compile", str(tmp_path / "hf"), "--out", str(tmp_path / "x"), "--quiet")
    assert r.returncode == SourceError.exit_code and "offline" in r.stderr


def test_require_fusion_fails_on_unfused_layer(tmp_path):
    (tmp_path / "odd.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class OddRouterMoE(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate = nn.Linear(16, 4, bias=False)
                self.w_in = nn.Parameter(torch.randn(4, 8, 16) * 0.3)
                self.w_out = nn.Parameter(torch.randn(4, 16, 8) * 0.3)

            def forward(self, x):
                w = torch.softmax(self.gate(x) ** 2, dim=-1)
                h = torch.relu(torch.einsum("th,eih->tei", x, self.w_in))
                return (w.unsqueeze(-1) * torch.einsum("tei,ehi->teh", h, self.w_out)).sum(1)

        def make():
            torch.manual_seed(0)
            return nn.Sequential(OddRouterMoE()).eval(), (torch.randn(5, 16),)
    '''))
    ok = moec("compile", "odd:make", "--out", str(tmp_path / "a"), "--quiet", cwd=str(tmp_path))
    assert ok.returncode == 0 and "left unfused" in ok.stdout
    strict = moec("compile", "odd:make", "--out", str(tmp_path / "b"), "--quiet", "--require-fusion",
                  cwd=str(tmp_path))
    assert strict.returncode == 7 and "--require-fusion" in strict.stderr and not (tmp_path / "b").exists()


def test_verification_failure_exits_8_and_keeps_nothing_unless_asked(userpkg, tmp_path):
    # An impossible tolerance makes verification fail on a correct artifact.
    out = tmp_path / "v"
    r = moec("compile", "userpkg.models:tiny_moe", "--out", str(out), "--quiet", "--tolerance", "1e-12",
             cwd=userpkg)
    assert r.returncode == 8 and "exceeds tolerance" in r.stderr and not out.exists()
    r = moec("compile", "userpkg.models:tiny_moe", "--out", str(out), "--quiet", "--tolerance", "1e-12",
             "--keep-failed", cwd=userpkg)
    assert r.returncode == 8 and (tmp_path / "v.failed" / "model.onnx").exists() and not out.exists()
