"""The package as a newcomer meets it: what ``import fastvae`` costs, what
``available_backends`` promises, the README's "Use" example, and links that resolve in a clone."""
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastvae
from cases import TEST_DEVICE

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _python(script, **environment):
    env = {k: v for k, v in os.environ.items() if k not in environment or environment[k] is not None}
    env.update({k: v for k, v in environment.items() if v is not None})
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_import_does_not_import_dynamo():
    """``torch._dynamo`` doubles the cost of an import; fastvae must not pull it in."""
    out = _python("import sys, torch\nbefore = 'torch._dynamo' in sys.modules\nimport fastvae\n"
                  "print(before, sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    assert out.strip() == "False []", out


def _runs(name, device):
    """Whether a loss, its backward and a sample run on ``name`` for ``device`` and agree with
    the reference."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(3, 5, generator=g, device=device)
    x_hat = torch.randn(3, 5, generator=g, device=device, requires_grad=True)
    mu = torch.randn(3, 2, generator=g, device=device, requires_grad=True)
    results = []
    for backend in (name, "reference"):
        with fastvae.use_backend(backend):
            loss = fastvae.elbo_loss(x, x_hat, mu, mu, free_bits=0.1)
            z = fastvae.reparameterize(mu, mu, 2, seed=4)
            results.append([loss, z] + list(torch.autograd.grad(loss + z.sum(), (x_hat, mu))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_every_listed_backend_runs_on_the_test_device():
    listed = fastvae.available_backends(TEST_DEVICE)
    assert "reference" in listed
    for name in listed:
        _runs(name, TEST_DEVICE)


def test_available_backends_in_a_fresh_process_can_run():
    """Without the Triton interpreter (a user's process): every backend listed for a device
    type this machine has runs there, and the list for no device is their union."""
    script = """
import torch, fastvae
types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
union = set()
for device in types:
    for name in fastvae.available_backends(device):
        union.add(name)
        with fastvae.use_backend(name):
            x = torch.randn(3, 4, device=device)
            fastvae.elbo_loss(x, x, x[:, :2], x[:, :2])
            fastvae.reparameterize(x, x, seed=1)
assert sorted(union) == fastvae.available_backends(), (union, fastvae.available_backends())
print(fastvae.available_backends("cpu"))
"""
    listed_for_cpu = _python(script, TRITON_INTERPRET=None)
    assert "triton" not in listed_for_cpu, "Triton runs on CPU only under its interpreter"


# ----------------------------------------------------------------------------------------------
# the README
# ----------------------------------------------------------------------------------------------
def _snippet(heading):
    """The first python block under the README heading ``heading`` (e.g. '## Use')."""
    text = (ROOT / "README.md").read_text()
    level = heading.split()[0]
    section = re.search(rf"^{re.escape(heading)}\s*$(.*?)(?=^#{{1,{len(level)}}} )", text,
                        re.S | re.M)
    assert section, f"README.md has no '{heading}' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block, f"the '{heading}' section has no python block"
    return block.group(1)


def test_readme_use_example_runs():
    """The README's "Use" block, with a two-layer encoder/decoder standing in for the
    user's (``encoder(x) -> (mu, logvar)``, ``decoder(z) -> (x_hat, x_logvar)``): it runs, the
    loss is a finite scalar and both networks get finite gradients."""
    torch.manual_seed(0)
    features, latent = 12, 3
    enc, dec = nn.Linear(features, 2 * latent), nn.Linear(latent, 2 * features)
    namespace = {"x": torch.randn(8, features),
                 "encoder": lambda x: enc(x).chunk(2, dim=-1),
                 "decoder": lambda z: dec(z).chunk(2, dim=-1)}
    exec(compile(_snippet("## Use"), "README.md:Use", "exec"), namespace)
    loss = namespace["loss"]
    assert loss.dim() == 0 and loss.isfinite()
    for layer in (enc, dec):
        assert layer.weight.grad is not None and layer.weight.grad.isfinite().all()


def test_readme_dreg_example_runs():
    """The README's DReG training loop runs as written, and both networks get finite
    gradients from the last step."""
    torch.manual_seed(0)
    namespace = {}
    exec(compile(_snippet("### The importance-weighted bound, with DReG"), "README.md:DReG",
                 "exec"), namespace)
    assert namespace["loss"].isfinite() and namespace["log_px"].isfinite().all()
    assert namespace["log_px"].shape == (64,)
    for network in (namespace["encoder"], namespace["decoder"]):
        assert all(p.grad is not None and p.grad.isfinite().all() for p in network.parameters())


MARKDOWN = sorted(str(p.relative_to(ROOT)) for p in
                  [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("bench/*.md")]
                  if p.exists())
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)",
                  re.M)


@pytest.mark.parametrize("document", MARKDOWN)
def test_relative_links_resolve_in_the_repository(document):
    path = ROOT / document
    broken = []
    for match in LINK.finditer(path.read_text()):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # a URL (http:, mailto:, ...) or an anchor in the same page
        resolved = (path.parent / target.split("#")[0]).resolve()
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(target)
    assert not broken, f"{document}: links that do not resolve inside the repository: {broken}"


def test_source_mentions_only_documents_that_exist():
    """Docstrings and comments in fastvae/, kernels/ and csrc/ cite design documents by path;
    each cited ``*.md`` must be a file of the repository."""
    cited = set()
    for folder in ("fastvae", "kernels", "csrc"):
        for source in (ROOT / folder).rglob("*"):
            if source.suffix in (".py", ".h", ".cpp", ".cu", ".cuh"):
                cited |= {(str(source.relative_to(ROOT)), name) for name in
                          re.findall(r"[\w./-]*\w\.md\b", source.read_text())}
    missing = sorted((source, name) for source, name in cited
                     if not (ROOT / name).exists() and not (ROOT / "docs" / name).exists())
    assert not missing, f"cited documents that are not in the repository: {missing}"
