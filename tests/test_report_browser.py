"""report.html opened in a real headless browser: its tables and inlined images render.

Needs Chromium (Debian: ``apt-get install -y chromium``); skipped with that reason otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import needs_mnist

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)

pytestmark = [
    needs_mnist,
    pytest.mark.skipif(BROWSER is None, reason="no headless browser: install Chromium "
                       "(apt-get install -y chromium) to check that report.html renders"),
]

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", imgs.length + "/" + ok);
  document.body.setAttribute("data-rows", document.querySelectorAll("table tbody tr").length);
  document.body.setAttribute("data-tables", document.querySelectorAll("table").length);
});
</script>"""


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _browser(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--virtual-time-budget=5000", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90,
                          stdin=subprocess.DEVNULL)


def test_report_html_renders_tables_and_images(tmp_path: Path):
    from deepsqueeze.analysis.report import build_report
    from deepsqueeze.dsq import save
    from deepsqueeze.methods import create_method, select_layers

    torch.manual_seed(0)
    net = Small()
    prune = create_method("prune", sparsity=0.9)
    prune.apply(net, select_layers(net, None, prune.supported))
    run = tmp_path / "run"
    run.mkdir()
    save(net, run / "model.dsq", extra_meta={"dataset": "mnist"},
         example_inputs=torch.zeros(2, 1, 28, 28))
    _, page = build_report(run, runs=3, memory=False)
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text)  # self-contained
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = _browser("--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None, dom.stdout[:2000]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    total, decoded = map(int, attrs["images"].split("/"))
    assert total >= 1 and decoded == total  # every inlined PNG decoded by the browser
    assert int(attrs["tables"]) >= 3 and int(attrs["rows"]) >= 15
    assert "top-1, test split" in dom.stdout and "Horowitz" in dom.stdout

    shot = tmp_path / "shot.png"
    res = _browser(f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    import matplotlib.image

    pixels = torch.from_numpy(matplotlib.image.imread(shot)[..., :3].copy())
    assert pixels.std() > 0.05  # not a blank page: text, table borders and plots drawn
