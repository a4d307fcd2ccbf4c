"""Look at layers in Neuroglancer, offline: the bundled client plus a small file server.

`serve(layers)` starts the Neuroglancer viewer of the `neuroglancer` Python package (it
bundles the client, so nothing is fetched from the internet) with one Neuroglancer layer per
precomputed layer. Remote layers (gs://, s3://, http(s)://) are handed to Neuroglancer as
``precomputed://`` sources that the browser fetches itself; an s3:// layer on an S3-compatible
endpoint of its own (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL: MinIO, Ceph, moto) as that
endpoint's path-style http(s) URL, which Neuroglancer reads unsigned (the bucket must allow
anonymous reads), where an s3:// source would ask AWS. Local layers (file:// or plain
paths) are served read-only by `LayerFileServer`, a threaded HTTP server on the same bind
address: CloudVolume stores their chunks gzipped as ``NAME.gz`` while Neuroglancer asks for
``NAME``, so such files go out as they are with ``Content-Encoding: gzip`` (``br`` for
``.br``), with CORS headers; anything else is a 404.

Nothing here starts at import time; `ViewerSession.stop()` shuts both servers down.
"""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import json
import os
import posixpath
import re
import shutil
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import brotli  # a dependency of cloud-files, which stores .br files
import numpy as np

from deepem3d.errors import InputError
from deepem3d.storage.cloud import check_bucket

REMOTE_SCHEMES = ("gs://", "s3://", "http://", "https://")
ENCODINGS = (("gzip", ".gz"), ("br", ".br"))  # (Content-Encoding, file suffix)
LAYOUTS = ("4panel", "xy", "xz", "yz", "3d", "xy-3d", "xz-3d", "yz-3d")

# Three channels (affinities x, y, z; or any RGB-like map) as red, green, blue.
RGB_SHADER = """\
void main() {
  emitRGB(vec3(toNormalized(getDataValue(0)),
               toNormalized(getDataValue(1)),
               toNormalized(getDataValue(2))));
}
"""


# --------------------------------------------------------------------------- file server


def _decompress(data: bytes, encoding: str) -> bytes:
    """The identity bytes of a file stored with `encoding` (gzip or br)."""
    return gzip.decompress(data) if encoding == "gzip" else brotli.decompress(data)


def _accepts(accept_encoding: str | None, encoding: str) -> bool:
    """Whether an Accept-Encoding header admits `encoding` (no header admits anything)."""
    if accept_encoding is None:
        return True
    weights = {}
    for item in accept_encoding.split(","):
        token, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights[token.lower()] = weight
    return weights.get(encoding, weights.get("*", 0.0)) > 0


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single `bytes=a-b` range as (start, end exclusive); None when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    if start >= end:
        return None
    return start, end


class _LayerRequestHandler(http.server.BaseHTTPRequestHandler):
    server: _LayerHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "deepem3d-layers"

    # -- HTTP verbs -------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _method_not_allowed(self) -> None:
        self._error(405, "only GET, HEAD and OPTIONS", extra={"Allow": "GET, HEAD, OPTIONS"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    # -- helpers ----------------------------------------------------------------------------

    def log_message(self, format: str, *args: object) -> None:
        log = self.server.log
        if log is not None:
            log(f"{self.address_string()} - {format % args}")

    def _cors(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Range, Content-Type")
        self.send_header(
            "Access-Control-Expose-Headers",
            "Content-Length, Content-Range, Content-Encoding, Accept-Ranges",
        )

    def _error(self, status: int, message: str, extra: Mapping[str, str] | None = None) -> None:
        body = f"{status} {message}\n".encode()
        self.send_response(status)
        self._cors()
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _resolve(self) -> tuple[str | None, str | None, int]:
        """(file, content encoding, 200) for the file a request names, else (None, None, status).

        The plain name wins; otherwise NAME.gz or NAME.br, sent with their encoding.
        """
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        parts = path.split("/")[1:]
        if any(part in ("..", ".") or "\\" in part or "\0" in part for part in parts):
            return None, None, 403
        if len(parts) < 2 or not all(parts):
            return None, None, 404
        root = self.server.roots.get(parts[0])
        if root is None:
            return None, None, 404
        plain = os.path.join(root, *parts[1:])
        for encoding, suffix in ((None, ""), *ENCODINGS):
            target = os.path.realpath(plain + suffix)
            if os.path.commonpath([root, target]) != root:
                return None, None, 403  # e.g. a link that points out of the layer
            if os.path.isfile(target):
                return target, encoding, 200
        return None, None, 404

    def _serve(self, body: bool) -> None:
        parts = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).split("/", 2)[1:]
        override = self.server.overrides.get(tuple(parts)) if len(parts) == 2 else None
        if override is not None:
            self._headers(200, len(override), {})
            if body:
                self.wfile.write(override)
            return
        target, encoding, status = self._resolve()
        if target is None:
            self._error(status, "forbidden" if status == 403 else "not found")
            return
        try:
            f = open(target, "rb")  # closed by the `with` below
        except OSError:  # gone since _resolve looked (a layer being rewritten)
            self._error(404, "not found")
            return
        with f:
            if encoding is None:
                self._send_file(f, body)
            else:
                self._send_encoded(f.read(), encoding, body)

    def _headers(self, status: int, length: int, extra: Mapping[str, str]) -> None:
        self.send_response(status)
        self._cors()
        is_info = posixpath.basename(urllib.parse.urlsplit(self.path).path) == "info"
        self.send_header(
            "Content-Type", "application/json" if is_info else "application/octet-stream"
        )
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-cache")  # layers change while a run writes them
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()

    def _send_file(self, f, body: bool) -> None:
        size = os.fstat(f.fileno()).st_size
        requested = self.headers.get("Range")
        if requested is None:
            self._headers(200, size, {"Accept-Ranges": "bytes"})
            if body:
                shutil.copyfileobj(f, self.wfile)
            return
        span = _parse_range(requested, size)
        if span is None:
            self._error(416, "range not satisfiable", extra={"Content-Range": f"bytes */{size}"})
            return
        start, end = span
        self._headers(
            206,
            end - start,
            {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end - 1}/{size}"},
        )
        if body:
            f.seek(start)
            self.wfile.write(f.read(end - start))

    def _send_encoded(self, data: bytes, encoding: str, body: bool) -> None:
        requested = self.headers.get("Range")
        wants_identity = requested is not None or not _accepts(
            self.headers.get("Accept-Encoding"), encoding
        )
        if not wants_identity:  # the client takes the stored bytes
            self._headers(200, len(data), {"Content-Encoding": encoding, "Vary": "Accept-Encoding"})
            if body:
                self.wfile.write(data)
            return
        plain = _decompress(data, encoding)
        if requested is None:
            self._headers(200, len(plain), {"Vary": "Accept-Encoding"})
            if body:
                self.wfile.write(plain)
            return
        span = _parse_range(requested, len(plain))
        if span is None:
            self._error(
                416, "range not satisfiable", extra={"Content-Range": f"bytes */{len(plain)}"}
            )
            return
        start, end = span
        self._headers(206, end - start, {"Content-Range": f"bytes {start}-{end - 1}/{len(plain)}"})
        if body:
            self.wfile.write(plain[start:end])


class _LayerHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    roots: dict[str, str]
    overrides: dict[tuple[str, str], bytes]
    log: Callable[[str], None] | None

    def handle_error(self, request: socket.socket,
                     client_address: tuple[str, int] | tuple[str, int, int, int]) -> None:
        # Neuroglancer drops requests for chunks that left the view: not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _LayerHTTPServer6(_LayerHTTPServer):
    address_family = socket.AF_INET6


def _host_for_url(bind_address: str) -> str:
    """The host part a browser should use to reach a server bound to `bind_address`."""
    if bind_address in ("0.0.0.0", "::", ""):
        return socket.getfqdn()  # as neuroglancer does for its own URL
    if ":" in bind_address:
        return f"[{bind_address}]"
    return bind_address


class LayerFileServer:
    """Serves local layer directories read-only over HTTP, one URL prefix per layer.

    `roots` maps a URL-safe name to a directory: ``GET /NAME/PATH`` answers the file
    ``DIR/PATH``, or ``DIR/PATH.gz`` / ``DIR/PATH.br`` with its Content-Encoding. Only GET,
    HEAD and OPTIONS; no directory listings; no path above a root; CORS on every answer.
    `overrides` maps (name, path) to bytes served instead of that file (the file is never
    written). `log`, when given, receives one access-log line per request.
    """

    def __init__(
        self,
        roots: Mapping[str, str],
        bind_address: str = "127.0.0.1",
        port: int = 0,
        log: Callable[[str], None] | None = None,
        overrides: Mapping[tuple[str, str], bytes] | None = None,
    ) -> None:
        for name in roots:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"not a URL-safe layer name: {name!r}")
        server_class = _LayerHTTPServer6 if ":" in bind_address else _LayerHTTPServer
        try:
            self._httpd = server_class((bind_address, port), _LayerRequestHandler)
        except OSError as err:
            raise InputError(
                f"cannot serve layers on {bind_address}:{port} ({err.strerror}): "
                "pick another --data-port or --bind-address"
            ) from None
        self._httpd.roots = {name: os.path.realpath(path) for name, path in roots.items()}
        self._httpd.log = log
        self._httpd.overrides = dict(overrides or {})
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://{_host_for_url(bind_address)}:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="deepem3d-layer-server",
            daemon=True,
        )
        self._thread.start()

    def layer_url(self, name: str) -> str:
        return f"{self.url}/{urllib.parse.quote(name)}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=10)
        self._httpd.server_close()

    def __enter__(self) -> LayerFileServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class ViewedLayer:
    """One layer as the viewer shows it."""

    name: str  # the Neuroglancer layer name (and URL prefix of a local layer)
    path: str  # the CloudVolume path it came from
    kind: str  # "image" or "segmentation", from the info's `type`
    source: str  # the Neuroglancer source URL (precomputed://...)
    num_channels: int
    resolution: tuple[float, float, float]  # nm, mip 0
    offset: tuple[int, int, int]  # voxels, mip 0
    size: tuple[int, int, int]  # voxels, mip 0
    num_mips: int
    local_dir: str | None = None
    note: str | None = None  # something the user should know (e.g. what was left out)
    meshes: bool = False  # the info names a mesh directory
    skeletons: bool = False  # the info names a skeleton directory Neuroglancer can load

    @property
    def center(self) -> tuple[float, float, float]:
        return tuple(o + s / 2 for o, s in zip(self.offset, self.size))


def _local_dir(path: str) -> str | None:
    """The directory of a local layer path (file:// or plain), None for a remote one."""
    if path.startswith("file://"):
        return os.path.abspath(os.path.expanduser(path[len("file://") :]))
    if "://" in path:
        return None
    return os.path.abspath(os.path.expanduser(path))


def _base_name(path: str) -> str:
    tail = path.split("://", 1)[-1].rstrip("/")
    name = posixpath.basename(tail) or "layer"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "layer"
    return name


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _missing_skeleton_info(vol, local_dir: str | None) -> str | None:
    """The `skeletons` directory an info names but that has no info file yet, else None.

    Neuroglancer fails to load the whole layer, volume included, when the skeleton source's
    info is missing (a mesh info may be missing: it falls back to legacy meshes).
    """
    skeletons = vol.info.get("skeletons")
    if not skeletons or "://" in skeletons:
        return None
    key = posixpath.join(skeletons, "info")
    if local_dir is not None:
        plain = os.path.join(local_dir, *key.split("/"))
        present = any(os.path.isfile(plain + suffix) for suffix in ("", ".gz", ".br"))
    else:
        from cloudfiles import CloudFiles

        present = CloudFiles(vol.cloudpath).exists(key)
    return None if present else skeletons


def _describe(path: str, name: str) -> tuple[ViewedLayer, dict | None]:
    """Check a layer (InputError when it is missing).

    Returns it (its `source` still empty) and, where the viewer must see another info than
    the one stored, that info (else None).
    """
    from deepem3d.storage.layers import open_layer

    local = _local_dir(path)
    if local is not None and not os.path.isdir(local):
        raise InputError(f"no layer directory at {local}: check the path")
    if local is None and not path.startswith(REMOTE_SCHEMES):
        scheme = path.split("://", 1)[0]
        raise InputError(
            f"cannot view {path}: {scheme}:// is not supported; use a local path, file://, "
            "gs://, s3://, http:// or https://"
        )
    vol = open_layer(path)
    info = dict(vol.info)
    changed = False
    kind = "segmentation" if info.get("type") == "segmentation" else "image"
    note = None
    skeletons = _missing_skeleton_info(vol, local) if kind == "segmentation" else None
    if skeletons is not None:
        if local is not None:
            del info["skeletons"]
            changed = True
            note = f"no {skeletons}/info yet: skeletons left out of the view"
        else:
            note = (
                f"no {skeletons}/info yet: Neuroglancer cannot load this layer until "
                "skeletons are made (or `skeletons` is removed from its info)"
            )
    layer = ViewedLayer(
        name=name,
        path=vol.cloudpath if local is None else "file://" + local,
        kind=kind,
        source="",
        num_channels=int(vol.num_channels),
        resolution=tuple(float(r) for r in vol.resolution),
        offset=tuple(int(v) for v in vol.voxel_offset),
        size=tuple(int(s) for s in vol.volume_size),
        num_mips=len(info.get("scales", [])) or 1,
        local_dir=local,
        note=note,
        meshes=kind == "segmentation" and bool(info.get("mesh")),
        skeletons=kind == "segmentation" and bool(info.get("skeletons")),
    )
    return layer, (info if changed else None)


#: the order a run's layers are shown in: the image first (it sets the view), the map next
#: (hidden: it would cover the image), then the segmentation and the ground truth
RUN_ORDER = ("image", "map", "segmentation", "ground_truth")
#: segments selected in the 3D panel of a run's segmentation: the largest ones
SHOWN_SEGMENTS = 5


def run_layers(paths: Sequence[str]) -> list[str]:
    """A run's output folder (one holding report.json, local or in a bucket) stands for its
    layers, in RUN_ORDER; any other path stands for itself. Layers the run wrote under its
    output folder are read under the folder given (a run moved, copied or pulled from a
    bucket); those it read from elsewhere stay where the report says."""
    out = []
    for path in paths:
        report = _run_report(path)
        if report is None:
            out.append(path)
            continue
        layers = report.get("layers") or {}
        root = report.get("output")
        if isinstance(root, str):
            root = root.rstrip("/") + "/"
            here = path.rstrip("/") + "/"
            layers = {k: here + v[len(root):] if isinstance(v, str) and v.startswith(root)
                      else v for k, v in layers.items()}
        out += [layers[k] for k in RUN_ORDER if k in layers]
        out += [v for k, v in layers.items() if k not in RUN_ORDER]
    return out


def _run_report(path: str) -> dict | None:
    """The report.json of a run's output folder at `path`, or None (no run folder there)."""
    folder = _local_dir(path)
    if folder is None:  # a bucket out of reach: one line in seconds (CloudFiles retries for
        check_bucket(path)  # tens of seconds, which the except below would hide)
    try:
        if folder is not None:
            report_path = os.path.join(folder, "report.json")
            if not os.path.isfile(report_path):
                return None
            with open(report_path) as f:
                report = json.load(f)
        else:
            from cloudfiles import CloudFiles

            report = CloudFiles(path).get_json("report.json")
    except Exception:  # noqa: BLE001  (a report cut short, a bucket out of reach: the path
        return None  # is opened as a layer, which says what is wrong with it)
    return report if isinstance(report, dict) else None


#: the box, in voxels of the coarsest mip, in which the shown segments are counted: about
#: 16 MiB of uint64 whatever the layer's size (a whole coarsest mip of a 10,000^2 x 1,000 layer
#: downsampled 2,2,1 five times is 780 MB, read before the viewer could start)
COUNTED_BOX = (256, 256, 32)


def largest_segments(path: str, count: int = SHOWN_SEGMENTS) -> list[int]:
    """The ids of the `count` largest segments, counted at the layer's coarsest mip in a box
    of at most COUNTED_BOX at the layer's centre."""
    from cloudvolume import CloudVolume
    from cloudvolume.lib import Bbox

    vol = CloudVolume(path, progress=False, fill_missing=True)
    vol.mip = max(vol.available_mips)
    start, size = np.asarray(vol.voxel_offset), np.asarray(vol.volume_size)
    box = np.minimum(size, COUNTED_BOX)
    low = start + (size - box) // 2
    labels = np.asarray(vol[Bbox(low, low + box)])
    ids, sizes = np.unique(labels[labels > 0], return_counts=True)
    return [int(i) for i in ids[np.argsort(sizes)[::-1][:count]]]


def browser_url(path: str) -> str:
    """The URL the browser fetches a remote layer from: an s3:// path on an endpoint of its own
    (boto3's variables, as CloudVolume reads them) is that endpoint's path-style URL."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and path.startswith("s3://"):
        return f"{endpoint.rstrip('/')}/{path.removeprefix('s3://')}"
    return path


def describe_layers(paths: Sequence[str]) -> list[tuple[ViewedLayer, dict | None]]:
    """Check every layer and give each a unique name (from its directory name)."""
    if not paths:
        raise InputError("name at least one layer to view")
    paths = run_layers(paths)
    taken: set[str] = set()
    described = []
    for path in paths:
        path = path.removeprefix("precomputed://")
        described.append(_describe(path, _unique(_base_name(path), taken)))
    return described


# --------------------------------------------------------------------------- viewer


@dataclass
class ViewerSession:
    """A running viewer: open `url` in a browser; `stop()` ends it."""

    url: str
    layers: list[ViewedLayer]
    data_url: str | None = None  # the file server of the local layers, if any
    viewer: object = field(default=None, repr=False)  # the neuroglancer.Viewer
    _file_server: LayerFileServer | None = field(default=None, repr=False)
    _stop_neuroglancer: bool = field(default=False, repr=False)

    def stop(self) -> None:
        """Stop serving (both servers); the URL stops working. Safe to call twice."""
        if self._file_server is not None:
            self._file_server.stop()
            self._file_server = None
        if self._stop_neuroglancer:
            import neuroglancer

            neuroglancer.stop()
            self._stop_neuroglancer = False

    def __enter__(self) -> ViewerSession:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    layers: Sequence[str],
    bind_address: str = "127.0.0.1",
    port: int = 0,
    data_port: int = 0,
    layout: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ViewerSession:
    """Start Neuroglancer showing `layers`; return the session (its `.url` to open).

    `port` is the Neuroglancer viewer's port, `data_port` the local layers' file server's;
    0 picks a free one. Both listen on `bind_address` (use 0.0.0.0 to reach them from other
    machines). The view is centred on the first layer, in nm at its mip-0 resolution, zoomed
    to show its whole xy extent. `log` receives the file server's access log, one line per
    request. Raises InputError for a missing layer or a port that cannot be bound.

    Neuroglancer's server is process-wide: when one is already running (another session),
    the new viewer joins it and `bind_address` / `port` do not apply to it.
    """
    if layout is not None and layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    described = describe_layers(layers)
    local = [(layer, info) for layer, info in described if layer.local_dir is not None]
    file_server = None
    if local:
        file_server = LayerFileServer(
            {layer.name: layer.local_dir for layer, _ in local},
            bind_address,
            data_port,
            log,
            overrides={
                (layer.name, "info"): json.dumps(info).encode()
                for layer, info in local
                if info is not None
            },
        )
    viewed = []
    for layer, _ in described:
        if layer.local_dir is not None:
            source = "precomputed://" + file_server.layer_url(layer.name)
        else:
            source = "precomputed://" + browser_url(layer.path)
        viewed.append(dataclasses.replace(layer, source=source))

    try:
        import neuroglancer

        started_here = not neuroglancer.server.is_server_running()
        if started_here:
            neuroglancer.set_server_bind_address(bind_address, bind_port=port)
        try:
            viewer = neuroglancer.Viewer()
        except OSError as err:
            raise InputError(
                f"cannot start Neuroglancer on {bind_address}:{port} ({err.strerror}): "
                "pick another --port or --bind-address"
            ) from None
        _show(neuroglancer, viewer, viewed, layout)
        url = viewer.get_viewer_url()
        if ":" in bind_address and f"//{bind_address}:" in url:  # an IPv6 host, bracketed
            url = url.replace(f"//{bind_address}:", f"//{_host_for_url(bind_address)}:", 1)
    except BaseException:
        if file_server is not None:
            file_server.stop()
        raise
    return ViewerSession(
        url=url,
        layers=viewed,
        data_url=file_server.url if file_server is not None else None,
        viewer=viewer,
        _file_server=file_server,
        _stop_neuroglancer=started_here,
    )


def _zoom(layer: ViewedLayer) -> float:
    """Cross-section scale (x voxels per screen pixel) that shows the layer's xy extent.

    Capped where the coarsest mip would need more than a few voxels per pixel, so that a
    large layer without downsamples does not start by loading all of its chunks.
    """
    extent = max(layer.size[0], layer.size[1] * layer.resolution[1] / layer.resolution[0])
    fit = extent / 320.0  # a 4panel quadrant of a laptop window is about 350 pixels high
    return min(max(fit, 1 / 16), 4.0 * 2 ** (layer.num_mips - 1))


def _show(neuroglancer, viewer, viewed: Sequence[ViewedLayer], layout: str | None) -> None:
    first = viewed[0]
    with viewer.txn() as s:
        s.dimensions = neuroglancer.CoordinateSpace(
            names=["x", "y", "z"], units="nm", scales=list(first.resolution)
        )
        s.position = list(first.center)
        s.cross_section_scale = _zoom(first)
        s.projection_scale = 2.5 * 320 * _zoom(first)
        first_segmentation = True
        image_shown = False
        for layer in viewed:
            if layer.kind == "segmentation":
                s.layers[layer.name] = neuroglancer.SegmentationLayer(source=layer.source)
                if first_segmentation and (layer.meshes or layer.skeletons):
                    # the largest segments' meshes and skeletons in the 3D panel (every
                    # segment is coloured in the slices whatever is selected)
                    s.layers[layer.name].segments = set(largest_segments(layer.path))
                first_segmentation = False
                continue
            elif layer.num_channels == 3:
                s.layers[layer.name] = neuroglancer.ImageLayer(
                    source=layer.source, shader=RGB_SHADER
                )
            else:
                s.layers[layer.name] = neuroglancer.ImageLayer(source=layer.source)
            if layer.kind == "image":
                # the first image is shown; one after it (a map) would cover it
                s.layers[layer.name].visible = not image_shown
                image_shown = True
        s.layout = layout
