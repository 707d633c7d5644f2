"""zoo.analysis.show and python -m zoo show: one self-contained HTML page whose embedded numbers are collect's,
the logit lens's and logit_attribution's; and that page in a real headless Chromium, driven over the DevTools
protocol on a pipe (no driver library): it renders without console errors, its screenshot is not blank,
choosing another head redraws the pattern with that head's numbers, hovering a token or a lens cell shows its
values, and the PNG buttons download PNG files. Without Chromium the browser test skips, naming what is missing."""
import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch

import zoo
from zoo import hooks
from zoo.__main__ import main
from zoo.analysis import logit_attribution, logit_lens, save_html, show
from zoo.analysis.show import DIGITS

PROMPT = "The for statement is used to iterate over the elements"
CLOSE = 0.5 * 10 ** -DIGITS + 1e-9  # the page's numbers are zoo's rounded to DIGITS decimals
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def model():
    return zoo.load("tiny-llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def page(model, tmp_path_factory):
    return save_html(model, PROMPT, tmp_path_factory.mktemp("show") / "report.html")


def embedded(text: str) -> dict:
    (found,) = re.findall(r'<script type="application/json" id="zoo-data">(.*?)</script>', text, flags=re.S)
    return json.loads(found)


def check_numbers(model, data: dict) -> None:
    """The page's numbers against collect's patterns (every head), logit_lens and logit_attribution."""
    ids = model.tokenizer.encode(PROMPT, bos=True)
    tokens = torch.tensor([ids])
    assert data["ids"] == ids and len(data["tokens"]) == len(ids)
    cache = hooks.collect("blocks.*.pattern", gather=True)
    with torch.no_grad():
        model(tokens, hooks=cache)
    assert len(data["patterns"]) == len(model.blocks)
    for i, layer in enumerate(data["patterns"]):
        want = cache[f"blocks.{i}.pattern"][0]  # (heads, q, k)
        assert len(layer) == want.shape[0]
        for h, rows in enumerate(layer):
            assert [len(r) for r in rows] == list(range(1, len(ids) + 1))  # keys 0..q: the rest is masked
            page = torch.tensor([r + [0.0] * (len(ids) - len(r)) for r in rows], dtype=torch.float64)
            assert (page - want[h].double()).abs().max() <= CLOSE, (i, h)
    lens = logit_lens(model, tokens)
    assert data["lens"]["names"] == lens.names and data["lens"]["ids"] == lens.tokens[:, 0].tolist()
    assert (torch.tensor(data["lens"]["probs"], dtype=torch.float64) - lens.probs[:, 0].double()).abs().max() <= CLOSE
    first, second = model(tokens)[0, -1].topk(2).indices.tolist()
    attr = logit_attribution(model, tokens, first, second)
    shown = data["attribution"]
    assert shown["names"] == attr.names and shown["position"] == len(ids) - 1
    assert (torch.tensor(shown["shares"], dtype=torch.float64) - attr.shares[:, 0].double()).abs().max() <= CLOSE
    assert abs(shown["total"] - float(attr.total[0])) <= CLOSE and abs(shown["logit_diff"] - float(attr.logit_diff[0])) <= CLOSE
    assert shown["answer"] == model.tokenizer.decode([first]) and shown["wrong"] == model.tokenizer.decode([second])


def test_the_page_is_one_file_that_needs_no_network(page):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"https?:|<link|<iframe|<img|\bsrc=|@import|url\(", text), "something to fetch"
    assert len(re.findall(r"<script", text)) == 2  # the data and one script of plain JS


def test_the_numbers_embedded_are_collects(model, page):
    check_numbers(model, embedded(page.read_text(encoding="utf-8")))


def test_tokens_are_their_text_and_markup_in_the_prompt_stays_text(model):
    text = show(model, 'if a < b & "c" </script> <b>x</b>')
    data = embedded(text)
    assert data["tokens"][0] == "<bos>" and "".join(data["tokens"][1:]) == 'if a < b & "c" </script> <b>x</b>'
    assert "</script> <b>" not in text.split('id="zoo-data">')[1].split("</script>")[0]
    assert "<title>zoo: if a &lt; b &amp; &quot;c&quot; &lt;/script&gt;" in text
    assert embedded(show(model, [1, 50, 60], answer=7))["attribution"]["wrong"] is None  # ids, and one logit


def test_the_command_writes_the_page_and_refuses_bad_input_in_one_line(model, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["show", "tiny-llama", "--prompt", PROMPT, "--out", str(out), "--dtype", "float32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    check_numbers(model, embedded(out.read_text(encoding="utf-8")))
    for argv, message in ((["--prompt", " ", "--out", str(out)], "--prompt=' ' is not accepted: some text"),
                          (["--prompt", "x", "--out", str(tmp_path / "r.txt")], "r.txt: the page is written to an .html"),
                          (["--prompt", "x", "--out", str(tmp_path)], "is a directory"),
                          (["--prompt", "x", "--out", str(tmp_path / "no" / "r.html")], "does not exist"),
                          (["--prompt", "x", "--out", str(out), "--k", "0"], "--k=0 is not accepted")):
        assert main(["show", "tiny-llama", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert main(["show", str(tmp_path / "missing"), "--prompt", "x", "--out", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def leaves(data, path=""):
    """(path, value) for every number and string of the page's data."""
    if isinstance(data, dict):
        return [leaf for k, v in data.items() for leaf in leaves(v, f"{path}/{k}")]
    if isinstance(data, list):
        return [leaf for i, v in enumerate(data) for leaf in leaves(v, f"{path}[{i}]")]
    return [(path, data)]


def test_the_command_under_torchrun_writes_one_processs_page(tmp_path):
    """python -m zoo show at TP=2 (fp32): rank 0 writes the page, once, with the one-process page's tokens, names
    and lens ids, and its numbers within fp32 rounding (1e-5)."""
    alone, parallel = tmp_path / "alone.html", tmp_path / "tp2.html"
    assert main(["show", "tiny-llama", "--prompt", PROMPT, "--out", str(alone), "--dtype", "float32"]) == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "zoo", "show", "tiny-llama", "--prompt", PROMPT, "--out", str(parallel), "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"wrote {parallel}") == 1
    want, got = (leaves(embedded(p.read_text(encoding="utf-8"))) for p in (alone, parallel))
    assert [path for path, _ in got] == [path for path, _ in want]
    for (path, a), (_, b) in zip(want, got):
        if isinstance(a, float) or isinstance(b, float):
            assert abs(a - b) <= 1e-5, (path, a, b)
        else:
            assert a == b, (path, a, b)


# ---- in a headless browser ------------------------------------------------------------------------
class Chromium:
    """Headless Chromium on the DevTools protocol over a pipe (--remote-debugging-pipe: it reads JSON messages,
    each ended by a NUL byte, on fd 3 and writes its replies and events on fd 4), one page attached."""

    def __init__(self, profile, width=1200, height=1800):
        (commands, self.commands), (self.replies, replies) = os.pipe(), os.pipe()
        # the browser's ends go on fds 3 and 4, where Chromium looks for them: moved above those first, then put
        # there by a small Python that execs Chromium
        low = (commands, replies)
        commands, replies = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in low)
        for fd in low:
            os.close(fd)
        place = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
        self.process = subprocess.Popen(
            [sys.executable, "-c", place, str(commands), str(replies), CHROMIUM, "--headless", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "--host-resolver-rules=MAP * ~NOTFOUND"],  # and no name resolves: the page gets no network
            pass_fds=(commands, replies), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (commands, replies):
            os.close(fd)
        self.buffer, self.last, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable", page=True)
        self.send("Emulation.setDeviceMetricsOverride", page=True, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def send(self, method: str, page: bool = False, **params) -> dict:
        self.last += 1
        message = {"id": self.last, "method": method, "params": params, **({"sessionId": self.session} if page else {})}
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.commands, data):]
        while True:
            reply = self.read()
            if reply.get("id") == self.last:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def read(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no message from Chromium in {timeout} s")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit status {self.process.poll()})")
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def wait_for(self, method: str) -> dict:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self.read())
        return next(e for e in self.events if e.get("method") == method)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", page=True, expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def mouse(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", page=True, type="mouseMoved", x=x, y=y)

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and error log entries (failed loads among them)."""
        out = []
        for e in self.events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.exceptionThrown":
                out.append(json.dumps(params["exceptionDetails"])[:500])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                out.append(json.dumps(params["args"])[:500])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                out.append(params["entry"]["text"])
        return out

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)


def blue(v: float) -> tuple[int, int, int]:
    """The page's colour scale (show.html's blue())."""
    t = max(0.0, min(1.0, v))
    return round(255 - 222 * t), round(255 - 153 * t), round(255 - 75 * t)


def pixel(browser, canvas: str, x: float, y: float) -> tuple[int, int, int]:
    return tuple(browser.evaluate(f"Array.from(document.getElementById('{canvas}').getContext('2d')"
                                  f".getImageData({x}, {y}, 1, 1).data.slice(0, 3))"))


def test_the_page_in_a_headless_browser(model, page, tmp_path):
    if CHROMIUM is None:
        pytest.skip("needs chromium: Debian's package chromium (apt-get install chromium), for the browser test")
    browser = Chromium(tmp_path / "profile")
    try:
        downloads = tmp_path / "downloads"
        downloads.mkdir()
        browser.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads), eventsEnabled=True)
        browser.send("Page.navigate", page=True, url=page.as_uri())
        browser.wait_for("Page.loadEventFired")
        assert browser.errors() == []
        data = browser.evaluate("JSON.parse(document.getElementById('zoo-data').textContent)")
        check_numbers(model, data)  # as the browser reads them

        # another head: the canvas changes, and a cell is drawn in that head's colour for its number
        n, heads = len(data["tokens"]), len(data["patterns"][0])
        assert browser.evaluate("document.getElementById('head').options.length") == heads
        cell, left, top = browser.evaluate("[att.cell, att.left, att.top]")
        q, k = n - 1, 1
        at = (left + k * cell + cell // 2, top + q * cell + cell // 2)
        before = browser.evaluate("document.getElementById('attention').toDataURL()")
        assert pixel(browser, "attention", *at) == blue(data["patterns"][0][0][q][k])
        browser.evaluate("const s = document.getElementById('head'); s.value = '3'; s.dispatchEvent(new Event('change'))")
        assert browser.evaluate("document.getElementById('attention').toDataURL()") != before
        assert pixel(browser, "attention", *at) == blue(data["patterns"][0][3][q][k])
        browser.evaluate("const l = document.getElementById('layer'); l.value = '2'; l.dispatchEvent(new Event('change'))")
        assert pixel(browser, "attention", *at) == blue(data["patterns"][2][3][q][k])

        # hovering a token tints the tokens it reads; hovering a lens cell shows its top tokens
        x, y = browser.evaluate("(() => { const r = tokenSpans[5].getBoundingClientRect(); "
                                "return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        browser.mouse(x, y)
        tints = browser.evaluate("tokenSpans.map(s => s.style.background)")
        assert tints[6:] == ["rgb(255, 255, 255)"] * (n - 6) and len(set(tints[:6])) > 1
        x, y = browser.evaluate("(() => { const r = lensCanvas.getBoundingClientRect(); "
                                "return [r.left + ln.left + 2.5 * ln.w, r.top + ln.top + 1.5 * ln.h]; })()")
        browser.mouse(x, y)
        tip = browser.evaluate("tip.textContent")
        assert tip.startswith(f"{data['lens']['names'][1]}, after {json.dumps(data['tokens'][2])} (2):")
        assert json.dumps(data["lens"]["tokens"][1][2][0]) in tip

        # the screenshot is not blank: decoded by the browser itself, it has many colours and much that is not white
        shot = browser.send("Page.captureScreenshot", page=True, format="png")["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
        colours, inked = browser.evaluate(
            "(async () => { const img = new Image(); img.src = 'data:image/png;base64," + shot + "'; await img.decode();"
            " const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;"
            " const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);"
            " const px = ctx.getImageData(0, 0, c.width, c.height).data; const seen = new Set(); let inked = 0;"
            " for (let i = 0; i < px.length; i += 4) { seen.add(px[i] << 16 | px[i + 1] << 8 | px[i + 2]);"
            " if (px[i] + px[i + 1] + px[i + 2] < 720) inked++; }"
            " return [seen.size, inked / (px.length / 4)]; })()")
        assert colours > 100 and inked > 0.05, (colours, inked)

        # each PNG button downloads its figure as a PNG file
        browser.evaluate("document.querySelectorAll('button[data-png]').forEach(b => b.click())")
        deadline = time.monotonic() + 30
        names = {"attention-L2H3.png", "lens.png", "dla.png"}
        while {p.name for p in downloads.iterdir()} != names and time.monotonic() < deadline:
            time.sleep(0.1)
        assert {p.name for p in downloads.iterdir()} == names
        assert all((downloads / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for name in names)
        assert browser.errors() == []
    finally:
        browser.close()
