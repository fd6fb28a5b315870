"""A CIFAR-10 archive in torchvision's format, made from the synthetic data, served over HTTP on 127.0.0.1.

The tests point torchvision's CIFAR10 at it (tests/fake_machine/sitecustomize.py,
FAKE_CIFAR10) to run the real download path: download, checksum, extraction.
"""

import collections
import functools
import hashlib
import http.server
import io
import json
import os
import pickle
import tarfile
import threading
import time

import numpy as np

from cifar10ds.data import CLASSES, SyntheticCIFAR10
from conftest import FAKE_MACHINE

ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def md5(data):
    return hashlib.md5(data).hexdigest()


def batch_file(dataset, rows):
    """One pickled batch as CIFAR-10 stores it: rows of 3072 bytes, the red, green and blue planes."""
    data = dataset.data[rows].transpose(0, 3, 1, 2).reshape(len(rows), 3072)
    return pickle.dumps({"batch_label": "synthetic", "labels": [dataset.targets[i] for i in rows],
                         "data": np.ascontiguousarray(data), "filenames": [f"{i}.png" for i in rows]})


def make_archive(folder, train_per_batch=1000, test_size=1000):
    """Write ARCHIVE into `folder` and return what torchvision must check it against (FAKE_CIFAR10's json)."""
    train, test = SyntheticCIFAR10(5 * train_per_batch, train=True), SyntheticCIFAR10(test_size, train=False)
    files = {name: batch_file(train, range(i * train_per_batch, (i + 1) * train_per_batch))
             for i, name in enumerate(TRAIN_BATCHES)}
    files["test_batch"] = batch_file(test, range(test_size))
    files["batches.meta"] = pickle.dumps({"label_names": list(CLASSES), "num_cases_per_batch": train_per_batch})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    archive = buffer.getvalue()
    (folder / ARCHIVE).write_bytes(archive)
    return {"tgz_md5": md5(archive), "md5": {name: md5(content) for name, content in files.items()}}


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files, counts each one sent whole, and logs nothing. Under /stall/ it sends a file's headers and its
    first bytes, then nothing more until the server closes: a server that stopped sending. Under /slow/ it sends
    the file in 60 parts, 0.2 s apart: a slow link that keeps sending."""

    def do_GET(self):
        if self.path.startswith(("/stall/", "/slow/")):
            how, name = self.path.split("/")[1:]
            content = (self.server.folder / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if how == "stall":
                self.wfile.write(content[:4096])
                self.wfile.flush()
                self.server.closing.wait()
                return
            size = -(-len(content) // 60)
            for start in range(0, len(content), size):
                self.wfile.write(content[start:start + size])
                self.wfile.flush()
                time.sleep(0.2)
            self.server.downloads[self.path.lstrip("/")] += 1
            return
        try:
            super().do_GET()
        except ConnectionError:
            return  # the client hung up early (a redirect check reads only the headers)
        self.server.downloads[self.path.lstrip("/")] += 1

    def log_message(self, *args):
        pass


class Server:
    """An HTTP server on 127.0.0.1 serving `folder`, in a thread, until close()."""

    def __init__(self, folder, checksums):
        handler = functools.partial(CountingHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.downloads = collections.Counter()  # URL path: times sent whole
        self.httpd.folder, self.httpd.closing = folder, threading.Event()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.checksums = checksums

    def env(self, path=ARCHIVE):
        """The environment of a launch whose torchvision downloads `path` from this server."""
        url = f"http://127.0.0.1:{self.httpd.server_port}/{path}"
        return {"FAKE_CIFAR10": json.dumps({"url": url, **self.checksums}), "no_proxy": "127.0.0.1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_MACHINE), os.environ.get("PYTHONPATH")]))}

    def downloads(self, path=ARCHIVE):
        """How many times `path` was sent whole."""
        return self.httpd.downloads[path]

    def close(self):
        self.httpd.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
