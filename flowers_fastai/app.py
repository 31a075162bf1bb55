"""A small web demo: drop or pick a photo in a page on localhost and see the predicted class and the five
calibrated probabilities as bars.

    pip install -e .[demo]
    python -m flowers_fastai.app                      # the shipped CNN on http://127.0.0.1:7860
    python -m flowers_fastai.app --model ensemble --vit-weights vit_flowers.pth

Starlette + uvicorn are an optional extra, imported only when the app is built, so the rest of the package
never needs them (and never imports this module). Each upload is streamed, with its size checked as it
arrives, into a temporary folder of its own that is deleted once the request is answered: nothing is
written anywhere else.

Slow and oversized clients cannot hold the server: a request's head must arrive within --header-timeout
seconds and fit in --max-header-kb (uvicorn's h11 protocol, whose limit httptools lacks), an upload's body
within --upload-timeout seconds (else 408), an idle connection is closed after --keep-alive seconds. An upload the
model cannot read, whatever the decoder raises, is answered 400, never 500.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import tempfile
from pathlib import Path

from .predict import load_chosen_model, model_choices, set_threads, threads_option
from .submit import predict_proba

DEFAULT_MAX_MB = 10
MB = 2 ** 20
# Server limits (CLI options). Uvicorn alone holds a connection that trickles its request head for ever (its
# keep-alive timer starts only after a first response, and every byte resets it), takes a head of any size with
# httptools, and has no deadline for a body: a trickled upload held a connection and a temp folder for minutes.
DEFAULT_UPLOAD_TIMEOUT = 30.0    # s for a whole upload body: 10 MB needs ~2.8 Mbit/s; a local demo is far faster
DEFAULT_HEADER_TIMEOUT = 10.0    # s for each request head, from the connection (or the previous answer) on
DEFAULT_KEEP_ALIVE = 5.0         # s an idle keep-alive connection stays open (uvicorn's default)
DEFAULT_MAX_HEADER_KB = 64       # the request head (request line + headers): cookies of other localhost apps fit
# Memory budget for the photos being decoded at once. A small upload can decode to ~89 Mpx (PIL's limit): ~0.7 GB
# each while it is processed; 12 at once took 7.9 GB. Each upload is admitted only while the estimates of the
# decodes in flight fit the budget (the others wait, holding only their file on disk); one that alone does not
# fit is refused with 413. The default admits one WebP at PIL's pixel limit, or two PNGs.
DEFAULT_MAX_MEMORY_MB = 2048
# Bytes per pixel of decoding and preprocessing one image (docs/api.md "Memory"), and the fixed part per request.
DECODE_BYTES_PER_PIXEL = 8
DECODE_BYTES_PER_PIXEL_BY_FORMAT = {'WEBP': 19, 'AVIF': 19, 'JPEG2000': 19}
DECODE_OVERHEAD = 32 * 2 ** 20
# Room for the multipart framing (boundaries, part headers) around the file, so a file of exactly the limit passes.
MULTIPART_OVERHEAD = 64 * 1024
INSTALL_HINT = 'pip install -e .[demo]'
log = logging.getLogger(__name__)


def _import_demo_dependencies():
    """Import starlette and uvicorn, and return python-multipart's parser module; else an ImportError that
    says how to install them."""
    try:
        for name in ('starlette', 'uvicorn'):
            importlib.import_module(name)
        try:
            multipart = importlib.import_module('python_multipart.multipart')
        except ModuleNotFoundError:   # python-multipart < 0.0.13 named its package `multipart`
            multipart = importlib.import_module('multipart.multipart')
    except ModuleNotFoundError as err:
        raise ImportError(f'the web demo needs {err.name or "its optional dependencies"}, which is not installed; '
                          f'install the demo extra with: {INSTALL_HINT}') from None
    return multipart


def decode_cost(path: Path) -> tuple[int, str]:
    """(The bytes decoding `path` may take at most, its size in words), from its header alone: nothing is
    decoded. A file PIL cannot even open costs the fixed part only (the model refuses it at once)."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            (w, h), fmt = img.size, img.format
    except Exception:   # noqa: BLE001 - no image: predict_proba says why, with a 400
        return DECODE_OVERHEAD, 'an unreadable file'
    per_pixel = DECODE_BYTES_PER_PIXEL_BY_FORMAT.get(fmt, DECODE_BYTES_PER_PIXEL)
    return DECODE_OVERHEAD + per_pixel * w * h, f'a {w}x{h} {fmt} image'


class MemoryBudget:
    """A counting semaphore of bytes: `hold(n)` waits until n more bytes fit under `limit`, and gives them back
    on leaving. `peak` is the most ever held at once (what the tests check against `limit`)."""

    def __init__(self, limit: int):
        import threading
        self.limit, self.in_use, self.peak = int(limit), 0, 0
        self._free = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        if n > self.limit:
            raise ValueError(f'{n} bytes is over the whole budget of {self.limit}')
        with self._free:
            self._free.wait_for(lambda: self.in_use + n <= self.limit)
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._free:
                self.in_use -= n
                self._free.notify_all()


class UploadTooLarge(Exception):
    """The upload passed the size limit: answered with 413."""


class BadUpload(Exception):
    """The request is not one file in a multipart form: answered with 400 and this message."""


def _unreadable_message(err: Exception, path: Path, name: str) -> str:
    """Why the model could not read the upload, naming the user's file rather than the temporary one."""
    reason = str(err).replace(str(path), name)
    if not isinstance(err, (ValueError, OSError)):   # outside the bad-input contract: say what was raised
        reason = f'{name} could not be decoded ({type(err).__name__}: {reason})'
    return f'Not a photo the model can read: {reason}.'


def _megabytes(n_bytes: int) -> str:
    return f'{n_bytes / MB:.3g} MB' if n_bytes >= MB else f'{n_bytes / 1024:.3g} KB'


def _too_large_message(max_bytes: int) -> str:
    return f'The file is too large: the limit is {_megabytes(max_bytes)}.'


class _FileWriter:
    """Callbacks for python-multipart's streaming parser: the first file part of the form goes straight to
    `path` as it arrives, and the count of its bytes stops the upload as soon as it passes `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int, parse_options_header):
        self.path, self.max_bytes, self.parse_options_header = path, max_bytes, parse_options_header
        self.filename: str | None = None
        self.size = 0
        self.complete = False           # the file part's closing boundary was seen (else: a truncated upload)
        self._file = None
        self._writing = False
        self._header_name = self._header_value = self._disposition = b''

    def callbacks(self) -> dict:
        return {'on_part_begin': self.on_part_begin, 'on_header_field': self.on_header_field,
                'on_header_value': self.on_header_value, 'on_header_end': self.on_header_end,
                'on_headers_finished': self.on_headers_finished, 'on_part_data': self.on_part_data,
                'on_part_end': self.on_part_end}

    def on_part_begin(self):
        self._disposition = b''

    def on_header_field(self, data, start, end):
        self._header_name += data[start:end]

    def on_header_value(self, data, start, end):
        self._header_value += data[start:end]

    def on_header_end(self):
        if self._header_name.strip().lower() == b'content-disposition':
            self._disposition = self._header_value
        self._header_name = self._header_value = b''

    def on_headers_finished(self):
        _, options = self.parse_options_header(self._disposition)
        if b'filename' in options and self._file is None:   # only the first file; other fields are skipped
            self.filename = Path(options[b'filename'].decode('utf-8', 'replace').replace('\\', '/')).name[:100]
            self._file = open(self.path, 'wb')
            self._writing = True

    def on_part_data(self, data, start, end):
        if not self._writing:
            return
        self.size += end - start
        if self.size > self.max_bytes:
            raise UploadTooLarge
        self._file.write(data[start:end])

    def on_part_end(self):
        if self._writing:
            self._file.close()
            self._writing = False
            self.complete = True

    def close(self):
        if self._file is not None:
            self._file.close()


async def _receive_upload(request, folder: Path, max_bytes: int, multipart) -> tuple[Path, str]:
    """Stream the multipart body of `request` into `folder`; the saved file's path and its display name.
    Raises UploadTooLarge before reading more than about `max_bytes`, BadUpload for anything but one file."""
    declared = request.headers.get('content-length')
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise UploadTooLarge   # refused on the header alone: the body is never read
    content_type, params = multipart.parse_options_header(request.headers.get('content-type', ''))
    if content_type != b'multipart/form-data' or not params.get(b'boundary'):
        raise BadUpload('Send the photo as a multipart/form-data upload (a form with a file field).')
    writer = _FileWriter(folder / 'upload', max_bytes, multipart.parse_options_header)
    try:
        parser = multipart.MultipartParser(params[b'boundary'], writer.callbacks())
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes + MULTIPART_OVERHEAD:   # the file's own count is checked by the writer
                raise UploadTooLarge
            parser.write(chunk)
        parser.finalize()
    except multipart.FormParserError as err:
        raise BadUpload(f'The upload is not valid multipart form data ({err}).') from None
    finally:
        writer.close()
    if writer.filename is None:
        raise BadUpload('The form holds no file: choose a photo to upload.')
    if not writer.complete:
        raise BadUpload(f'The upload of {writer.filename or "the file"} was cut off before its end.')
    return writer.path, writer.filename or 'the uploaded file'


def create_app(model, max_bytes: int = DEFAULT_MAX_MB * MB, upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT,
               max_memory: int = DEFAULT_MAX_MEMORY_MB * MB):
    """The Starlette app around `model` (anything `submit.predict_proba` takes): GET / is the page,
    POST /predict takes a multipart upload and answers {"class": ..., "probabilities": {class: p}}, or
    {"error": why} with 413 (over `max_bytes`, or an image whose decoding alone would take over `max_memory`
    bytes), 408 (the body took over `upload_timeout` seconds to arrive) or 400 (not an image, whatever the decoder
    raised, or not an upload). Uploads are decoded at once only while their estimated costs (`decode_cost`) fit
    in `max_memory` together (`MemoryBudget`, `app.state.memory`); the others wait their turn."""
    multipart = _import_demo_dependencies()
    import anyio
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    if max_bytes <= 0:
        raise ValueError(f'max_bytes must be positive, not {max_bytes}')
    if not upload_timeout > 0:
        raise ValueError(f'upload_timeout must be positive, not {upload_timeout}')
    if max_memory < DECODE_OVERHEAD:
        raise ValueError(f'max_memory must be at least {DECODE_OVERHEAD} bytes (one request\'s fixed part)')
    budget = MemoryBudget(max_memory)

    def classify(path: Path):
        """predict_proba once the decode fits in the budget; None when it never can (413)."""
        cost, what = decode_cost(path)
        if cost > budget.limit:
            return None, what, cost
        with budget.hold(cost):
            return predict_proba(model, path), what, cost
    page = PAGE.replace('__MAX_BYTES__', str(max_bytes)).replace('__LIMIT__', _megabytes(max_bytes))

    async def index(request):
        return HTMLResponse(page)

    async def predict(request):
        # A folder per request: concurrent uploads never meet, and leaving the block deletes everything.
        with tempfile.TemporaryDirectory(prefix='flowers-demo-') as folder:
            try:
                # uvicorn has no deadline for a body: without this one a trickled upload holds the connection
                # and this folder for as long as the client likes
                with anyio.fail_after(upload_timeout):
                    path, name = await _receive_upload(request, Path(folder), max_bytes, multipart)
            except TimeoutError:
                return JSONResponse({'error': f'The upload took longer than {upload_timeout:g} s and was stopped.'},
                                    status_code=408, headers={'Connection': 'close'})
            except UploadTooLarge:
                return JSONResponse({'error': _too_large_message(max_bytes)}, status_code=413)
            except BadUpload as err:
                return JSONResponse({'error': str(err)}, status_code=400)
            except ClientDisconnect:   # the client left mid-upload: nobody reads this answer
                return JSONResponse({'error': 'The upload was interrupted.'}, status_code=400)
            try:
                # The model is CPU-bound: a worker thread keeps the server answering meanwhile.
                probabilities, what, cost = await run_in_threadpool(classify, path)
            except Exception as err:   # noqa: BLE001 - decoding the user's bytes: any failure is theirs, a 400
                if not isinstance(err, (ValueError, OSError)):
                    log.warning('an upload the decoder failed on with %s', type(err).__name__, exc_info=True)
                return JSONResponse({'error': _unreadable_message(err, path, name)}, status_code=400)
        if probabilities is None:
            return JSONResponse({'error': f'The image is too large to classify: {name} is {what}, whose decoding '
                                          f'would take about {_megabytes(cost)}, over the demo\'s memory budget of '
                                          f'{_megabytes(budget.limit)}.'}, status_code=413)
        best = max(probabilities, key=probabilities.get)
        return JSONResponse({'class': best, 'probabilities': probabilities})

    app = Starlette(routes=[Route('/', index), Route('/predict', predict, methods=['POST'])])
    app.state.memory = budget
    return app


def _h11_with_head_deadline(head_timeout: float):
    """uvicorn's h11 protocol, plus a deadline for each request head: `head_timeout` seconds from the connection
    (or from the previous answer) to the end of the next request's headers, else the connection is closed.
    uvicorn arms no timer before a first request, and any byte cancels its keep-alive timer, so a client
    trickling a head (or the rest of a body already answered) was held for ever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class DemoH11Protocol(H11Protocol):
        _head_timer = None

        def _cancel_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _arm_head_timer(self):
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(head_timeout, self._head_too_slow)

        def _request_running(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _head_too_slow(self):
            self._head_timer = None
            if not self._request_running() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()

        def handle_events(self):
            super().handle_events()
            if self._request_running():   # the head is in: the app's upload deadline governs the body
                self._cancel_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and not self._request_running():
                self._arm_head_timer()

        def connection_lost(self, exc):
            self._cancel_head_timer()
            super().connection_lost(exc)

    return DemoH11Protocol


def _head_size(scope) -> int:
    """The bytes of a request's head as it came: request line and header lines."""
    target = len(scope.get('raw_path') or scope['path'].encode()) + (len(scope['query_string']) + 1
                                                                      if scope.get('query_string') else 0)
    return (len(scope['method']) + target + len('  HTTP/1.1\r\n\r\n')
            + sum(len(name) + len(value) + 4 for name, value in scope['headers']))


class _HeadLimit:
    """ASGI middleware: a request whose head is over `max_bytes` is answered 431 and its connection closed.
    h11's own limit covers only a head still arriving: one that came whole in a read or two (65-100 KB) passed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope['type'] == 'http' and _head_size(scope) > self.max_bytes:
            body = (b'{"error": "The request head is over the limit of %d bytes."}' % self.max_bytes)
            await send({'type': 'http.response.start', 'status': 431,
                        'headers': [(b'content-type', b'application/json'), (b'connection', b'close'),
                                    (b'content-length', str(len(body)).encode())]})
            await send({'type': 'http.response.body', 'body': body})
            return
        await self.app(scope, receive, send)


def server_config(app, host: str = '127.0.0.1', port: int = 7860, *,
                  header_timeout: float = DEFAULT_HEADER_TIMEOUT, keep_alive: float = DEFAULT_KEEP_ALIVE,
                  max_header_bytes: int = DEFAULT_MAX_HEADER_KB * 1024, log_level: str = 'info'):
    """The uvicorn.Config that serves `app` with the demo's limits: the h11 protocol (httptools, uvicorn's pick
    when installed, takes a request head of any size) with `max_header_bytes` for a request head and
    `header_timeout` seconds to send it, and `keep_alive` seconds for an idle connection."""
    import uvicorn
    if not (header_timeout > 0 and keep_alive > 0 and max_header_bytes > 0):
        raise ValueError('header_timeout, keep_alive and max_header_bytes must be positive')
    return uvicorn.Config(_HeadLimit(app, int(max_header_bytes)), host=host, port=port,
                          http=_h11_with_head_deadline(header_timeout),
                          h11_max_incomplete_event_size=int(max_header_bytes), timeout_keep_alive=keep_alive,
                          ws='none', log_level=log_level)


def _port(text: str) -> int:
    """A TCP port for argparse: 1 to 65535 (uvicorn took 99999 and listened elsewhere without a word)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a port number') from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f'{port} is not a port: ports are 1 to 65535')
    return port


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', choices=model_choices(), default='cnn',
                        help='what to serve (default: %(default)s, the shipped weights/cnn_flowers.pth)')
    parser.add_argument('--weights', help='weights of --model cnn or vit; with ensemble, the CNN\'s '
                                          '(default: <family>_flowers.pth in . or weights/)')
    parser.add_argument('--vit-weights', help='ViT weights for --model ensemble (or vit); no ViT file is shipped')
    parser.add_argument('--int8', action='store_true', help='the ViT\'s matmuls in int8 (faster on CPU)')
    parser.add_argument('--host', default='127.0.0.1',
                        help='address to listen on (default: %(default)s: this machine only)')
    parser.add_argument('--port', type=_port, default=7860, help='1 to 65535 (default: %(default)s)')
    parser.add_argument('--max-mb', type=float, default=DEFAULT_MAX_MB,
                        help='largest upload accepted, in MB of 2**20 bytes (default: %(default)s)')
    parser.add_argument('--upload-timeout', type=float, default=DEFAULT_UPLOAD_TIMEOUT, metavar='S',
                        help='seconds for a whole upload to arrive, else 408 (default: %(default)s)')
    parser.add_argument('--header-timeout', type=float, default=DEFAULT_HEADER_TIMEOUT, metavar='S',
                        help='seconds for a request\'s head to arrive, else the connection is closed '
                             '(default: %(default)s)')
    parser.add_argument('--keep-alive', type=float, default=DEFAULT_KEEP_ALIVE, metavar='S',
                        help='seconds an idle connection stays open (default: %(default)s)')
    parser.add_argument('--max-header-kb', type=float, default=DEFAULT_MAX_HEADER_KB, metavar='KB',
                        help='largest request head (request line + headers) in KB of 1024 bytes, at least 1, '
                             'else 431 (default: %(default)s)')
    parser.add_argument('--max-memory-mb', type=float, default=DEFAULT_MAX_MEMORY_MB, metavar='MB',
                        help='memory budget of the photos decoded at once, in MB of 2**20 bytes, at least 64: '
                             'uploads wait their turn, and one that alone needs more is refused with 413 '
                             '(default: %(default)s)')
    parser.add_argument('--threads', type=threads_option, default='auto',
                        help='intra-op threads: a number, or auto: the cores the load average shows idle, at least 1 '
                             '(default: %(default)s)')
    args = parser.parse_args(argv)
    for option in ('max_mb', 'upload_timeout', 'header_timeout', 'keep_alive', 'max_header_kb', 'max_memory_mb'):
        if not getattr(args, option) > 0:   # `not >` refuses nan too
            parser.error(f'--{option.replace("_", "-")} must be positive')
    # a limit that rounds to nothing (or leaves no room for a request) ended in a traceback
    for option, least, unit in (('max_mb', 1 / 1024, '1 KB (0.0009765625)'), ('max_header_kb', 1, '1'),
                                ('max_memory_mb', 64, '64')):
        if not getattr(args, option) >= least or getattr(args, option) == float('inf'):
            parser.error(f'--{option.replace("_", "-")} must be at least {unit} and finite')
    if args.model == 'cnn' and args.vit_weights:
        parser.error('--vit-weights needs --model vit or --model ensemble')
    if args.model == 'vit' and args.weights and args.vit_weights:
        parser.error('--model vit takes one weights file: give --weights or --vit-weights, not both')
    try:
        _import_demo_dependencies()   # before the slow model load, so a missing extra is reported at once
    except ImportError as err:
        sys.exit(f'error: {err}')
    try:
        model = load_chosen_model(args.model, args.weights, args.vit_weights, args.int8)
    except (FileNotFoundError, ValueError) as err:
        needs = ' (no ViT weights are shipped: train and export them, then pass --vit-weights)' \
            if args.model != 'cnn' else ''
        sys.exit(f'error: cannot load the {args.model} model{needs}: {err}')
    set_threads(args.threads)
    import uvicorn
    app = create_app(model, max_bytes=int(args.max_mb * MB), upload_timeout=args.upload_timeout,
                     max_memory=int(args.max_memory_mb * MB))
    config = server_config(app, args.host, args.port, header_timeout=args.header_timeout,
                           keep_alive=args.keep_alive, max_header_bytes=int(args.max_header_kb * 1024))
    print(f'Serving the {args.model} model on http://{args.host}:{args.port}/ (Ctrl+C stops it)', flush=True)
    uvicorn.Server(config).run()
    return 0


# One self-contained page: inline CSS and JS, nothing fetched from a CDN (the demo must work offline).
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Flower classifier</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.4rem; }
  #drop-zone { display: block; border: 2px dashed #999; border-radius: 8px; padding: 2rem; text-align: center;
               cursor: pointer; color: #555; }
  #drop-zone.over { border-color: #2a7; background: #efe; }
  #file { display: block; margin: 0.8rem auto 0; }
  #preview { display: none; max-width: 100%; max-height: 16rem; margin: 1rem auto; border-radius: 6px; }
  #status { color: #555; min-height: 1.2em; }
  #error { color: #b00; font-weight: 600; white-space: pre-wrap; }
  #error:empty { display: none; }
  #result-class { font-size: 1.6rem; font-weight: 700; margin: 0.5rem 0; }
  .bar-row { display: grid; grid-template-columns: 6rem 1fr 4rem; gap: 0.5rem; align-items: center; margin: 0.3rem 0; }
  .track { background: #eee; border-radius: 4px; height: 1.1rem; overflow: hidden; }
  .fill { background: #8ab; height: 100%; }
  .bar-row.best .fill { background: #2a7; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; }
</style>
</head>
<body>
<h1>Which flower is it? <small>(daisy, dandelion, rose, sunflower or tulip)</small></h1>
<label id="drop-zone" for="file">
  Drop a photo here, or pick one (up to __LIMIT__)
  <input id="file" type="file" accept="image/*">
</label>
<img id="preview" alt="the photo being classified">
<p id="status"></p>
<div id="error" role="alert"></div>
<div id="result" hidden>
  <div id="result-class"></div>
  <div id="probabilities"></div>
</div>
<script>
const MAX_BYTES = __MAX_BYTES__;  // shown to the user; the server enforces it
const input = document.getElementById('file');
const zone = document.getElementById('drop-zone');
const preview = document.getElementById('preview');
const statusLine = document.getElementById('status');
const errorBox = document.getElementById('error');
const result = document.getElementById('result');

function showError(message) {
  statusLine.textContent = '';
  errorBox.textContent = message;
}

function showResult(data) {
  document.getElementById('result-class').textContent = data['class'];
  const bars = document.getElementById('probabilities');
  bars.replaceChildren();
  for (const [name, p] of Object.entries(data.probabilities)) {
    const row = document.createElement('div');
    row.className = 'bar-row' + (name === data['class'] ? ' best' : '');
    row.dataset.class = name;
    const label = document.createElement('span');
    label.textContent = name;
    const track = document.createElement('div');
    track.className = 'track';
    const fill = document.createElement('div');
    fill.className = 'fill';
    fill.style.width = (100 * p).toFixed(1) + '%';
    track.appendChild(fill);
    const pct = document.createElement('span');
    pct.className = 'pct';
    pct.textContent = (100 * p).toFixed(1) + '%';
    row.append(label, track, pct);
    bars.appendChild(row);
  }
  statusLine.textContent = '';
  result.hidden = false;
}

async function classify(file) {
  errorBox.textContent = '';
  result.hidden = true;
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.style.display = file.type.startsWith('image/') ? 'block' : 'none';
  statusLine.textContent = 'Classifying ' + file.name + '...';
  const form = new FormData();
  form.append('file', file, file.name);
  let response;
  try {
    response = await fetch('predict', {method: 'POST', body: form});
  } catch (err) {
    // A server that refuses an oversized upload may close the connection before the browser reads its answer.
    const hint = file.size > MAX_BYTES ? ' The file is larger than the limit of __LIMIT__.' : '';
    showError('The upload failed: ' + err.message + '.' + hint);
    return;
  }
  let data;
  try {
    data = await response.json();
  } catch (err) {
    showError('The server answered ' + response.status + ' ' + response.statusText + ' without a result.');
    return;
  }
  if (!response.ok) {
    showError(data.error || ('The server answered ' + response.status + '.'));
    return;
  }
  showResult(data);
}

input.addEventListener('change', () => { if (input.files.length) classify(input.files[0]); });
zone.addEventListener('dragover', (event) => { event.preventDefault(); zone.classList.add('over'); });
zone.addEventListener('dragleave', () => zone.classList.remove('over'));
zone.addEventListener('drop', (event) => {
  event.preventDefault();
  zone.classList.remove('over');
  if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
});
</script>
</body>
</html>
"""


if __name__ == '__main__':
    sys.exit(main())
