"""`deepem3d view`: the layer file server over HTTP, the viewer session, and a real browser.

The browser test drives Debian's chromium (apt-get install chromium) with PyPI's playwright;
Neuroglancer draws with WebGL through SwiftShader. It is skipped where either is missing.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import brotli  # a dependency of cloud-files
import numpy as np
import pytest

from deepem3d import viewer
from deepem3d.storage.layers import create_layer
from deepem3d.storage.sharding import block_sharding
from deepem3d.viewer import LayerFileServer, serve
from tests.conftest import ROOT, assert_one_line_error, cli_here, run_cli

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHAPE = (64, 64, 8)
CHUNK = (32, 32, 8)


def make_layers(root: Path, sharded: bool = False) -> tuple[Path, Path]:
    """A uint8 image with a pattern and a uint64 segmentation of 16 blocks, on file://;
    `sharded`: each in one shard file (its 4 chunks)."""
    x, y, z = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]]
    image = ((x * 4 + (y // 8) * 20 + z * 10) % 256).astype(np.uint8)
    labels = (1 + x // 16 + 4 * (y // 16)).astype(np.uint64)
    common = dict(resolution=(8, 8, 40), size=SHAPE, chunk_size=CHUNK,
                  sharding=block_sharding(SHAPE, CHUNK, SHAPE) if sharded else None)
    vol = create_layer(str(root / "image"), layer_type="image", dtype="uint8", **common)
    vol[:, :, :] = image[..., np.newaxis]  # (a shard is made of x, y, z, channel)
    vol = create_layer(str(root / "seg"), layer_type="segmentation", dtype="uint64", **common)
    vol[:, :, :] = labels[..., np.newaxis]
    return root / "image", root / "seg"


def request(port: int, path: str, method: str = "GET", headers: dict | None = None):
    """One raw request (http.client keeps `..` in the path as it is)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- file server


def test_file_server_serves_layers_read_only(tmp_path):
    image, _ = make_layers(tmp_path / "layers")
    (tmp_path / "layers" / "secret.txt").write_text("not part of any layer")
    os.symlink(tmp_path / "layers" / "secret.txt", image / "link")
    chunk = "8_8_40/0-32_0-32_0-8"
    stored = (image / (chunk + ".gz")).read_bytes()
    assert not (image / chunk).exists()

    with LayerFileServer({"image": str(image)}) as server:
        port = server.port
        assert server.url == f"http://127.0.0.1:{port}"

        response, body = request(port, "/image/info")
        assert response.status == 200
        assert json.loads(body)["type"] == "image"
        assert response.getheader("Access-Control-Allow-Origin") == "*"
        assert response.getheader("Content-Type") == "application/json"

        # The chunk goes out as stored, gzipped, for a client that takes gzip.
        response, body = request(port, f"/image/{chunk}", headers={"Accept-Encoding": "gzip"})
        assert response.status == 200
        assert response.getheader("Content-Encoding") == "gzip"
        assert response.getheader("Access-Control-Allow-Origin") == "*"
        assert body == stored
        assert gzip.decompress(body) == gzip.decompress(stored)
        assert len(gzip.decompress(body)) == 32 * 32 * 8  # raw uint8 chunk

        # A client that refuses gzip gets the identity bytes; a Range gets a slice of them.
        response, body = request(port, f"/image/{chunk}", headers={"Accept-Encoding": "identity"})
        assert response.status == 200 and response.getheader("Content-Encoding") is None
        assert body == gzip.decompress(stored)
        response, body = request(port, f"/image/{chunk}", headers={"Range": "bytes=10-19"})
        assert response.status == 206 and body == gzip.decompress(stored)[10:20]
        response, body = request(port, "/image/info", headers={"Range": "bytes=0-0"})
        assert response.status == 206 and body == b"{"

        # A plain file wins over its .gz; .br goes out with Content-Encoding br.
        (image / "both").write_bytes(b"plain")
        (image / "both.gz").write_bytes(gzip.compress(b"gzipped"))
        response, body = request(port, "/image/both", headers={"Accept-Encoding": "gzip"})
        assert response.getheader("Content-Encoding") is None and body == b"plain"
        (image / "extra.br").write_bytes(brotli.compress(b"brotli bytes"))
        response, body = request(port, "/image/extra", headers={"Accept-Encoding": "gzip, br"})
        assert response.getheader("Content-Encoding") == "br"
        assert brotli.decompress(body) == b"brotli bytes"

        # HEAD: the headers, no body. OPTIONS: the CORS preflight.
        response, body = request(port, "/image/info", method="HEAD")
        assert response.status == 200 and body == b""
        assert int(response.getheader("Content-Length")) == (image / "info").stat().st_size
        response, _ = request(port, f"/image/{chunk}", method="OPTIONS")
        assert response.status == 204
        assert response.getheader("Access-Control-Allow-Origin") == "*"
        assert "GET" in response.getheader("Access-Control-Allow-Methods")
        assert "range" in response.getheader("Access-Control-Allow-Headers").lower()

        # Nothing above the served root, by `..` (plain or %-encoded) or by a link.
        for escape in (
            "/image/../secret.txt",
            "/image/%2e%2e/secret.txt",
            "/image/8_8_40/../../secret.txt",
            "/../layers/secret.txt",
            "/image/link",
        ):
            response, body = request(port, escape)
            assert response.status == 403, escape
            assert b"not part of any layer" not in body
            assert response.getheader("Access-Control-Allow-Origin") == "*"

        # Missing files, unknown layers and directories are 404; writes are refused.
        for missing in ("/image/8_8_40/0-32_0-32_8-16", "/other/info", "/image/8_8_40", "/"):
            response, _ = request(port, missing)
            assert response.status == 404, missing
        response, _ = request(port, "/image/info", method="PUT")
        assert response.status == 405
        assert (image / "info").is_file()


def name_products(seg: Path) -> None:
    """Name `mesh` and `skeletons` in a segmentation's info without writing them."""
    info = json.loads((seg / "info").read_text())
    info.update(mesh="mesh", skeletons="skeletons")
    (seg / "info").write_text(json.dumps(info))


def test_serve_without_browser(tmp_path):
    """The session: names, kinds, URLs; the stored info left alone; skeletons left out of a
    layer whose skeletons/info another tool never wrote."""
    image, seg = make_layers(tmp_path / "a")
    other_image, _ = make_layers(tmp_path / "b")
    name_products(seg)  # as another tool leaves it: skeletons named, never written
    session = serve([str(image), "file://" + str(seg), str(other_image)])
    try:
        assert session.url.startswith("http://127.0.0.1:") and "/v/" in session.url
        names = [layer.name for layer in session.layers]
        assert names == ["image", "seg", "image-2"]
        assert [layer.kind for layer in session.layers] == ["image", "segmentation", "image"]
        assert session.layers[0].center == (32.0, 32.0, 4.0)
        assert session.layers[1].source == f"precomputed://{session.data_url}/seg"
        assert session.layers[1].note is not None and "skeletons" in session.layers[1].note

        port = int(session.data_url.rsplit(":", 1)[1])
        served = json.loads(request(port, "/seg/info")[1])
        assert "skeletons" not in served and served["mesh"] == "mesh"
        assert json.loads((seg / "info").read_text())["skeletons"] == "skeletons"
        state = session.viewer.state
        assert np.allclose(state.dimensions.scales, [8e-9, 8e-9, 40e-9])  # in metres
        assert tuple(state.dimensions.units) == ("m", "m", "m")
        assert list(state.position) == [32.0, 32.0, 4.0]
    finally:
        session.stop()
    with pytest.raises(OSError):
        request(port, "/image/info")


def test_segmentation_alone_keeps_its_layout_and_counts_a_centre_box(tmp_path, monkeypatch):
    _, seg = make_layers(tmp_path)
    monkeypatch.setattr(viewer, "COUNTED_BOX", (16, 16, 4))
    # the box [24, 40) in x and y holds blocks 1..2 of 16 voxels each way: ids 6, 7, 10, 11
    assert sorted(viewer.largest_segments(str(seg), count=16)) == [6, 7, 10, 11]
    session = serve([str(seg)], layout="3d")
    try:
        assert session.viewer.state.layout.type == "3d"
    finally:
        session.stop()


def test_serve_remote_layers_as_they_are(tmp_path):
    """http(s)://, gs://, s3:// layers go to Neuroglancer as precomputed:// URLs, unserved."""
    image, seg = make_layers(tmp_path)
    name_products(seg)  # as a layer from a tool that names skeletons but never writes them
    with LayerFileServer({"image": str(image), "seg": str(seg)}) as remote:
        session = serve([f"{remote.url}/image/", f"precomputed://{remote.url}/seg"])
        try:
            assert session.data_url is None  # nothing local to serve
            assert [layer.source for layer in session.layers] == [
                f"precomputed://{remote.url}/image",
                f"precomputed://{remote.url}/seg",
            ]
            assert [layer.kind for layer in session.layers] == ["image", "segmentation"]
            # The remote info cannot be amended: the user is told why the layer will not load.
            assert "cannot load" in session.layers[1].note
        finally:
            session.stop()


# --------------------------------------------------------------------------- CLI errors


def test_view_missing_layer(tmp_path):
    assert_one_line_error(run_cli("view", str(tmp_path / "nope"), timeout=60), "no layer")
    assert_one_line_error(run_cli("view", str(tmp_path), timeout=60), "no precomputed layer")


def test_the_printed_view_command_can_be_pasted(tmp_path, monkeypatch):
    """`deepem3d demo` and `deepem3d run` end with the command that views their output: an
    output folder with a space in its name was printed unquoted (two layers to the shell)."""
    from deepem3d import picture
    from deepem3d.run import plan

    report = {"layers": {}, "stage_seconds": {}, "seconds": 0.0}
    monkeypatch.setattr(plan, "run_pipeline", lambda *args, **kwargs: report)
    monkeypatch.setattr(plan, "describe_scores", lambda report: "")
    monkeypatch.setattr(picture, "draw_run", lambda *args, **kwargs: 25)
    folder = tmp_path / "my runs" / "demo"
    for result in (cli_here("demo", folder),
                   cli_here("run", "isbi2012-demo", "--output", folder)):
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines() if "deepem3d view" in line)
        assert shlex.split(line.split(": ", 1)[1])[2:] == [str(folder)], line


# --------------------------------------------------------------------------- browser


def _reader(stream, lines: queue.Queue, log: list[str]) -> None:
    for line in stream:
        log.append(line)
        lines.put(line)
    lines.put(None)


def _data_drawn(png: bytes) -> tuple[bool, int]:
    """Whether the centre of the xy panel shows the segmentation's colours over the image."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    h, w, _ = pixels.shape
    centre = pixels[int(h * 0.4) : int(h * 0.6), int(w * 0.4) : int(w * 0.6)]
    colours = {tuple(p) for p in centre.reshape(-1, 3)}
    saturated = (centre.max(axis=2) - centre.min(axis=2) > 30).mean()
    return len(colours) >= 16 and saturated > 0.5, len(colours)


@pytest.fixture
def sync_playwright():
    """playwright's entry point, for Debian's chromium (skipped, with the reason, without)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium not installed: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed: pip install playwright")
    return sync_playwright


def test_view_in_headless_chromium(tmp_path, sync_playwright):
    image, seg = make_layers(tmp_path)

    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepem3d", "view", "--layout", "xy", "-v", str(image), str(seg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stdout_lines: queue.Queue = queue.Queue()
    stdout_log: list[str] = []
    stderr_log: list[str] = []
    for stream, lines, log in (
        (proc.stdout, stdout_lines, stdout_log),
        (proc.stderr, queue.Queue(), stderr_log),
    ):
        threading.Thread(target=_reader, args=(stream, lines, log), daemon=True).start()
    try:
        url = None
        while url is None:
            try:
                line = stdout_lines.get(timeout=max(1.0, 30 - (time.monotonic() - started)))
            except queue.Empty:
                line = None
            assert line is not None, f"no URL printed; stderr: {''.join(stderr_log)}"
            if line.startswith("Neuroglancer: "):
                url = line.split(": ", 1)[1].strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v/\w+/", url), url

        responses = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 800})
                page.on("response", lambda response: responses.append(response))
                page.goto(url, timeout=30_000)
                deadline = time.monotonic() + 40
                drawn, colours, png = False, 0, b""
                while time.monotonic() < deadline:
                    chunks = [r for r in responses if re.search(r"/(image|seg)/8_8_40/", r.url)]
                    if len(chunks) >= 8:  # 4 chunks per layer
                        png = page.screenshot()
                        drawn, colours = _data_drawn(png)
                        if drawn:
                            break
                    page.wait_for_timeout(500)
                (tmp_path / "screenshot.png").write_bytes(png)
                assert drawn, (
                    f"no data drawn ({colours} colours; screenshot {tmp_path / 'screenshot.png'})"
                )
                # What the browser got: every chunk of both layers, gzip undone by the browser.
                by_path = {re.sub(r"^http://[^/]+", "", r.url): r for r in chunks}
                for layer in ("image", "seg"):
                    for name in ("0-32_0-32_0-8", "32-64_0-32_0-8", "0-32_32-64_0-8"):
                        response = by_path[f"/{layer}/8_8_40/{name}"]
                        assert response.status == 200
                        assert response.headers.get("content-encoding") == "gzip"
                image_chunk = by_path["/image/8_8_40/0-32_0-32_0-8"].body()
                assert image_chunk == gzip.decompress(
                    (image / "8_8_40" / "0-32_0-32_0-8.gz").read_bytes()
                )
            finally:
                browser.close()

        # The file server's own access log (stderr, --verbose) saw the same requests.
        log = "".join(stderr_log)
        assert '"GET /image/8_8_40/0-32_0-32_0-8 HTTP/1.1" 200' in log, log
        assert '"GET /seg/8_8_40/0-32_0-32_0-8 HTTP/1.1" 200' in log, log

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, "".join(stderr_log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in "".join(stderr_log)
    # Keep a copy for people who want to look at what the browser drew.
    if os.environ.get("DEEPEM3D_SCREENSHOT"):
        shutil.copy(tmp_path / "screenshot.png", os.environ["DEEPEM3D_SCREENSHOT"])


def test_a_run_folder_stands_for_its_layers(tmp_path):
    """`deepem3d view RUN`: image first, the map hidden, the segmentation's largest segments
    selected for the 3D panel once it has meshes."""
    image, seg = make_layers(tmp_path)
    info = json.loads((seg / "info").read_text())
    info["mesh"] = "mesh"  # as the mesh stages leave it
    (seg / "info").write_text(json.dumps(info))
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"layers": {
        "segmentation": f"file://{seg}", "map": f"file://{image}",
        "image": f"file://{image}"}}))
    session = serve([str(run)])
    try:
        assert [layer.name for layer in session.layers] == ["image", "image-2", "seg"]
        state = {layer.name: layer for layer in session.viewer.state.layers}
        assert state["image"].visible is not False and state["image-2"].visible is False
        # 16 blocks of 16 x 16 x 8: all the same size, so any five of them
        assert len(state["seg"].layer.segments) == 5
    finally:
        session.stop()


def test_skeletons_alone_select_the_largest_segments(tmp_path):
    """A segmentation with skeletons and no meshes (a run's `skeletons` product alone) had no
    segment selected, so its 3D panel drew nothing; a skeleton directory without its info
    (left out of the view) still selects none."""
    _, seg = make_layers(tmp_path)
    info = json.loads((seg / "info").read_text())
    info["skeletons"] = "skeletons"  # as the skeleton stages leave it
    (seg / "info").write_text(json.dumps(info))
    session = serve([str(seg)])
    try:
        assert len(session.viewer.state.layers["seg"].segments) == 0  # no skeletons/info yet
    finally:
        session.stop()
    (seg / "skeletons").mkdir()
    (seg / "skeletons" / "info").write_text(json.dumps({
        "@type": "neuroglancer_skeletons", "transform": [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0],
        "vertex_attributes": []}))
    session = serve([str(seg)])
    try:
        assert len(session.viewer.state.layers["seg"].segments) == 5
    finally:
        session.stop()


def test_a_run_folder_moved_or_in_a_bucket_stands_for_its_own_layers(tmp_path):
    """The report records absolute paths: a run folder moved or copied was shown at (or
    failed on) its old place, and one in a bucket was not read as a run at all. Layers the
    run wrote are read under the folder given; those it read from elsewhere stay."""
    image, seg = make_layers(tmp_path / "moved")
    elsewhere = "file:///data/ground_truth"
    report = {"output": "file:///old/run", "layers": {
        "image": "file:///old/run/image", "segmentation": "file:///old/run/seg",
        "ground_truth": elsewhere}}
    (tmp_path / "moved" / "report.json").write_text(json.dumps(report))
    assert viewer.run_layers([str(tmp_path / "moved")]) == [
        f"{tmp_path / 'moved'}/image", f"{tmp_path / 'moved'}/seg", elsewhere]
    with LayerFileServer({"run": str(tmp_path / "moved")}) as remote:
        assert viewer.run_layers([f"{remote.url}/run"]) == [
            f"{remote.url}/run/image", f"{remote.url}/run/seg", elsewhere]
        assert viewer.run_layers([f"{remote.url}/run/image"]) == [f"{remote.url}/run/image"]


def test_an_image_after_a_segmentation_is_shown_and_an_ipv6_url_bracketed(tmp_path):
    """`deepem3d view SEG IMAGE` hid the only image (every image but the first layer was
    hidden, meant for maps over an image); `--bind-address ::1` printed http://::1:PORT."""
    image, seg = make_layers(tmp_path)
    session = serve([str(seg), str(image), str(image)], bind_address="::1")
    try:
        state = {layer.name: layer for layer in session.viewer.state.layers}
        assert state["image"].visible is not False and state["image-2"].visible is False
        assert session.url.startswith("http://[::1]:"), session.url
        port = int(session.url.split("]:", 1)[1].split("/", 1)[0])
        with socket.create_connection(("::1", port), timeout=10):
            pass  # the viewer answers where the URL says
    finally:
        session.stop()


def test_the_demos_largest_segments_are_drawn_in_3d(tmp_path, demo_output, sync_playwright):
    """`deepem3d view DEMO`: the 3D panel (slices hidden) draws the selected segments' meshes
    and skeletons: with the five largest selected it holds at least 5 times the non-background
    pixels it holds with none."""
    from PIL import Image

    session = serve([str(demo_output)], layout="3d")
    try:
        with session.viewer.txn() as s:
            s.show_slices = False
            s.show_axis_lines = False
            s.show_default_annotations = False  # the volume's bounding box
        names = [layer.name for layer in session.viewer.state.layers]
        assert names == ["image", "map", "segmentation", "ground_truth"], names
        selected = set(session.viewer.state.layers["segmentation"].segments)
        assert len(selected) == 5
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 800, "height": 600})
                page.goto(session.url, timeout=30_000)

                def drawn() -> int:
                    png = page.screenshot()
                    (tmp_path / "3d.png").write_bytes(png)
                    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
                    flat = pixels[60:, 40:].reshape(-1, 3)  # the panel, not the controls
                    colours, counts = np.unique(flat, axis=0, return_counts=True)
                    background = colours[np.argmax(counts)]  # the panel's own colour
                    return int((np.abs(flat - background).sum(axis=1) > 30).sum())

                with_meshes = 0
                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and with_meshes < 2000:
                    page.wait_for_timeout(1000)
                    with_meshes = drawn()
                with session.viewer.txn() as s:
                    s.layers["segmentation"].segments = set()
                page.wait_for_timeout(3000)
                without = drawn()
            finally:
                browser.close()
    finally:
        session.stop()
    print(f"3D panel pixels: {with_meshes} with the five largest selected, {without} with none")
    assert with_meshes >= 5 * max(without, 1), (with_meshes, without)
    if os.environ.get("DEEPEM3D_SCREENSHOT"):
        shutil.copy(tmp_path / "3d.png", os.environ["DEEPEM3D_SCREENSHOT"] + ".3d.png")


def test_sharded_layers_in_headless_chromium(tmp_path, sync_playwright):
    """Neuroglancer reads sharded layers (as `segment --sharded` writes them) through the file
    server's byte ranges: it asks for parts of each layer's one shard file, and draws the
    segmentation's colours over the image."""
    image, seg = make_layers(tmp_path, sharded=True)
    shards = {layer: next((layer / "8_8_40").glob("*.shard")).name for layer in (image, seg)}
    session = serve([str(image), str(seg)], layout="xy")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 800})
                responses = []
                page.on("response", lambda response: responses.append(response))
                page.goto(session.url, timeout=30_000)
                deadline = time.monotonic() + 40
                drawn, colours, png = False, 0, b""
                while time.monotonic() < deadline and not drawn:
                    page.wait_for_timeout(500)
                    png = page.screenshot()
                    drawn, colours = _data_drawn(png)
                (tmp_path / "sharded.png").write_bytes(png)
                assert drawn, f"no data drawn ({colours} colours; {tmp_path / 'sharded.png'})"
                for layer, name in shards.items():
                    parts = [r for r in responses
                             if r.url.endswith(f"/{layer.name}/8_8_40/{name}")]
                    assert parts and all(r.status == 206 for r in parts), layer.name
                    whole = (layer / "8_8_40" / name).read_bytes()
                    for r in parts:  # each range is those bytes of the file
                        start, end = (int(v) for v in re.match(
                            r"bytes (\d+)-(\d+)/", r.headers["content-range"]).groups())
                        assert r.body() == whole[start:end + 1]
            finally:
                browser.close()
    finally:
        session.stop()
