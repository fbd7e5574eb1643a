"""The client snippets of the README ("Try it locally") and docs/frontend.md, run as written.

Only the port changes: the docs use `v4d serve examples/local-tiny.yaml --port 8000`, the tests the
session's server (same model name, `v4-tiny`). Each snippet runs in its own Python process and must
exit cleanly and print what a newcomer should see.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from v4d.serving.chat import SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parents[2]
DOCS_URL = "http://127.0.0.1:8000"

pytestmark = pytest.mark.ray


def snippets(doc: str, section: str) -> list[str]:
    """The ```python blocks of one `#`-headed section of a Markdown file."""
    text = (ROOT / doc).read_text()
    start = text.index(section + "\n")
    level = section.split(" ")[0]
    end = re.search(rf"^{level} ", text[start + len(section) :], re.MULTILINE)
    body = text[start : start + len(section) + end.start()] if end else text[start:]
    return re.findall(r"^```python\n(.*?)^```", body, re.MULTILINE | re.DOTALL)


def run(code: str, base_url: str) -> str:
    assert DOCS_URL in code, "the snippet should talk to the documented server"
    proc = subprocess.run(
        [sys.executable, "-c", code.replace(DOCS_URL, base_url)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_readme_try_it_locally_prints_an_answer_and_the_thinking_stream(base_url):
    (code,) = snippets("README.md", "## Try it locally")
    out = run(code, base_url)
    answer, usage, stream = re.fullmatch(r"answer: (.*)\ntokens: (.*?)\n(.*)", out, re.DOTALL).groups()
    assert answer.strip(), out  # the OpenAI call (thinking off) returned text
    assert re.fullmatch(r"\d+ in, [1-9]\d* out", usage), out
    # The Anthropic stream labels its blocks: thinking first (on by default), each with some text.
    blocks = re.split(r"\n\[(thinking|text)\] ", stream)[1:]
    kinds, texts = blocks[0::2], blocks[1::2]
    assert kinds and kinds[0] == "thinking" and all(t.strip() for t in texts), out
    assert not [s for s in SPECIAL_TOKENS if s in out], out  # special tokens never reach the client


@pytest.mark.parametrize("section", ["### OpenAI SDK", "### Anthropic SDK"])
def test_frontend_sdk_examples_run(base_url, section):
    (code,) = snippets("docs/frontend.md", section)
    out = run(code, base_url)
    assert out.strip(), f"{section}: printed nothing"
    if section == "### Anthropic SDK":
        first, streamed = out.split("\n", 1)
        assert first.startswith("['thinking'"), out  # thinking on by default: a thinking block first
        assert streamed.strip(), out  # thinking off: text_stream has the answer
