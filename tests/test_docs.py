"""The docs site builds strictly (no broken link, no missing page), its config page lists every key of the schema,
and the README stays a short front page."""

import os
import re
import subprocess
import sys

from s2d_jax.config import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _keys(tree, prefix=""):
    for k, v in tree.items():
        yield from _keys(v, prefix + k + ".") if isinstance(v, dict) else [prefix + k]


def test_the_docs_build_strictly_with_every_config_key(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    page = (site / "reference" / "config" / "index.html").read_text()
    listed = set(re.findall(r"<tr>\s*<td><code>([a-z0-9_.]+)</code></td>", page))  # each row's first cell
    assert listed == set(_keys(defaults().to_dict()))
    assert re.search(r"report.wandb.mode</code></td>\s*<td><code>'online'</code></td>\s*<td>one of 'online', "
                     r"'offline', 'disabled'</td>\s*<td>online \(needs WANDB_API_KEY", page)  # default, rule, comment


def test_the_readme_is_a_short_front_page():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) < 200
    assert "make demo" in text and "make test" in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):  # every page it maps exists
        assert os.path.exists(os.path.join(ROOT, link)), link
