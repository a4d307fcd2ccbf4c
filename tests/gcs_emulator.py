"""gcp-storage-emulator, as the tests start it: `python -m tests.gcs_emulator start ...`.

The emulator stores an object's Content-Encoding but leaves the header out of its downloads,
which Google Cloud Storage sends (a raw download of a gzip object says `Content-Encoding:
gzip`, and CloudFiles decompresses what it is told is compressed). Here the download adds the
stored encoding, as the service does; nothing else changes.
"""

from __future__ import annotations

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        stored = storage.get_file_obj(request.params["bucket_name"],
                                      request.params["object_id"])
    except Exception:  # noqa: BLE001  (a missing object: the 404 is already in the response)
        return
    if stored.get("contentEncoding"):
        response["Content-Encoding"] = stored["contentEncoding"]


for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
        if handler is _download:
            handlers[method] = download

if __name__ == "__main__":
    main()
