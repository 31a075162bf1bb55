"""The web demo (flowers_fastai/app.py): its JSON endpoint through Starlette's TestClient, the page end to end in
headless Chromium driven by Selenium, the CLI's errors, the loopback-only opt-out of the network block, and hostile
clients (a trickled upload or request head, a 50 MB header; decoder errors of any type) against the real server."""
from __future__ import annotations

import contextlib
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from flowers_fastai.labels import CLASSES

from flowers_fastai.submit import load_cnn_model

from .conftest import NetworkBlocked
from .helpers import EXAMPLES, PHOTOS, REPO, dds_unknown_fourcc

SHIPPED_CNN = REPO / 'weights' / 'cnn_flowers.pth'
CHROMIUM, CHROMEDRIVER = Path('/usr/bin/chromium'), Path('/usr/bin/chromedriver')
LIMIT = 30 * 1024   # above four example photos (13-21 KB), below the sunflower (56 KB): one app shows both cases


def true_classes() -> dict[Path, str]:
    """Each example photo with its class, as examples/CREDITS.md records it."""
    rows = re.findall(r'^\| `([^`]+\.jpg)` \| (\w+) \|', (EXAMPLES / 'CREDITS.md').read_text(), re.M)
    assert len(rows) == 5
    return {EXAMPLES / name: label for name, label in rows}


def photo_of(label: str) -> Path:
    return next(path for path, c in true_classes().items() if c == label)


@pytest.fixture(scope='module')
def shipped_cnn():
    from flowers_fastai.submit import load_cnn_model
    return load_cnn_model(SHIPPED_CNN)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """An empty folder made tempfile's default for this test (the app's threads included): what is left shows."""
    folder = tmp_path / 'tmp'
    folder.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(folder))
    return folder


@pytest.fixture
def work_dir(tmp_path, monkeypatch):
    """An empty current directory: a relative write would land here."""
    folder = tmp_path / 'cwd'
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def model_calls(monkeypatch):
    """Spy on predict_proba as the app calls it: each call's path and the bytes that file held then."""
    from flowers_fastai import app
    calls = []

    def spy(model, path):
        calls.append((Path(path), Path(path).read_bytes() if Path(path).is_file() else None))
        return real(model, path)
    real = app.predict_proba
    monkeypatch.setattr(app, 'predict_proba', spy)
    return calls


@contextlib.contextmanager
def demo_client(model, **limits):
    pytest.importorskip('starlette', reason='the web demo extra is not installed: pip install -e .[demo]')
    from starlette.testclient import TestClient

    from flowers_fastai.app import create_app
    with TestClient(create_app(model, **limits)) as client:
        yield client


@pytest.fixture
def client(shipped_cnn, private_tmp, work_dir, model_calls):
    """The app around the shipped CNN, with a LIMIT small enough to test with the example photos."""
    with demo_client(shipped_cnn, max_bytes=LIMIT) as client:
        yield client


def post_file(client, name: str, data: bytes, content_type: str = 'image/jpeg'):
    return client.post('/predict', files={'file': (name, data, content_type)})


def test_each_example_photo_gets_the_models_class_and_five_probabilities(shipped_cnn, private_tmp, work_dir,
                                                                         model_calls):
    """The demo answers what the model answers (how often the model is right is measured on 778 photos in
    docs/results.md, not on these five)."""
    from flowers_fastai.submit import predict_proba
    with demo_client(shipped_cnn) as client:   # the default 10 MB limit
        responses = {photo: post_file(client, photo.name, photo.read_bytes()) for photo in true_classes()}
    for photo, (path_read, bytes_read) in zip(true_classes(), model_calls, strict=True):
        response = responses[photo]
        assert response.status_code == 200, response.text
        body = response.json()
        expected = predict_proba(shipped_cnn, photo)
        assert body['class'] == max(expected, key=expected.get), photo.name
        assert list(body['probabilities']) == CLASSES
        assert body['probabilities'] == pytest.approx(expected, abs=1e-5)
        assert sum(body['probabilities'].values()) == pytest.approx(1.0, abs=1e-5)
        # the model read the upload, byte for byte, from a folder inside the temp dir, gone after the answer
        assert bytes_read == photo.read_bytes()
        assert path_read.is_relative_to(private_tmp) and not path_read.exists()
    assert list(private_tmp.iterdir()) == [] and list(work_dir.iterdir()) == []


def test_a_text_file_is_refused_with_400_and_the_reason(client, private_tmp, work_dir):
    response = post_file(client, 'notes.txt', b'these are not the pixels you are looking for\n', 'text/plain')
    assert response.status_code == 400
    error = response.json()['error']
    assert 'notes.txt is not an image' in error
    assert str(private_tmp) not in error   # the user sees their file's name, not the server's temp path
    assert list(private_tmp.iterdir()) == [] and list(work_dir.iterdir()) == []


def test_an_empty_file_and_a_form_without_a_file_are_400(client):
    empty = post_file(client, 'empty.jpg', b'')
    assert empty.status_code == 400 and 'empty.jpg is an empty file' in empty.json()['error']
    no_file = client.post('/predict', files={'note': (None, b'hello')})   # a form field, no file
    assert no_file.status_code == 400 and 'no file' in no_file.json()['error']
    not_multipart = client.post('/predict', content=b'\xff\xd8\xff', headers={'content-type': 'image/jpeg'})
    assert not_multipart.status_code == 400 and 'multipart/form-data' in not_multipart.json()['error']


def test_an_upload_over_the_limit_is_refused_with_413_before_the_model_runs(client, private_tmp, model_calls):
    sunflower = photo_of('sunflower')
    assert sunflower.stat().st_size > LIMIT
    response = post_file(client, sunflower.name, sunflower.read_bytes())
    assert response.status_code == 413
    assert response.json()['error'] == 'The file is too large: the limit is 30 KB.'
    assert model_calls == [] and list(private_tmp.iterdir()) == []


def test_a_streamed_upload_without_content_length_is_cut_off_at_the_limit(client, private_tmp, model_calls):
    """No Content-Length to refuse on: the byte count while the body arrives stops it."""
    boundary = 'flowersboundary'
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            'Content-Type: image/jpeg\r\n\r\n').encode()

    def body():   # a generator: httpx sends it chunked, with no Content-Length; ten times the limit in all
        yield head
        for _ in range(10 * LIMIT // 1024):
            yield b'\0' * 1024
        yield f'\r\n--{boundary}--\r\n'.encode()
    response = client.post('/predict', content=body(),
                           headers={'content-type': f'multipart/form-data; boundary={boundary}'})
    assert response.status_code == 413 and 'too large' in response.json()['error']
    assert model_calls == [] and list(private_tmp.iterdir()) == []


def test_a_file_of_exactly_the_limit_is_not_too_large(client):
    response = post_file(client, 'noise.jpg', b'\1' * LIMIT)
    assert response.status_code == 400 and 'noise.jpg is not an image' in response.json()['error']


def test_the_page_has_the_controls_and_fetches_nothing_from_elsewhere(client):
    response = client.get('/')
    assert response.status_code == 200 and response.headers['content-type'].startswith('text/html')
    page = response.text
    for element_id in ('file', 'drop-zone', 'result-class', 'probabilities', 'error'):
        assert f'id="{element_id}"' in page
    assert 'up to 30 KB' in page
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page) and '@import' not in page


def test_without_the_demo_extra_the_app_says_how_to_install_it(monkeypatch, capsys):
    from flowers_fastai import app
    monkeypatch.setitem(sys.modules, 'starlette', None)   # as if starlette were not installed
    with pytest.raises(ImportError, match=re.escape('pip install -e .[demo]')):
        app.create_app(model=None)
    with pytest.raises(SystemExit, match=re.escape('pip install -e .[demo]')):
        app.main([])


def test_vit_and_ensemble_without_vit_weights_fail_with_a_clear_error(tmp_path, monkeypatch):
    pytest.importorskip('starlette', reason='the web demo extra is not installed: pip install -e .[demo]')
    from flowers_fastai import app
    if (REPO / 'weights' / 'vit_flowers.pth').exists():
        pytest.skip('a vit_flowers.pth is present in weights/')
    monkeypatch.chdir(tmp_path)
    for model in ('vit', 'ensemble'):
        with pytest.raises(SystemExit, match=r'no ViT weights are shipped.*vit_flowers\.pth not found'):
            app.main(['--model', model])
    with pytest.raises(SystemExit, match='missing.pth not found'):
        app.main(['--model', 'ensemble', '--vit-weights', str(tmp_path / 'missing.pth')])


def test_the_rest_of_the_package_never_imports_the_app():
    """Starlette and uvicorn are an optional extra: only `python -m flowers_fastai.app` may need them."""
    importing_app = re.compile(r'from\s+\.\s*app\b|from\s+\.\s+import\s+[^\n]*\bapp\b|flowers_fastai\.app\b|'
                               r'from\s+flowers_fastai\s+import\s+[^\n]*\bapp\b|\b(starlette|uvicorn)\b')
    for module in (REPO / 'flowers_fastai').glob('*.py'):
        if module.name != 'app.py':
            assert not importing_app.search(module.read_text()), module.name


@pytest.mark.loopback
def test_the_loopback_marker_lets_through_this_machine_only():
    with socket.create_server(('127.0.0.1', 0)) as server:
        with socket.create_connection(server.getsockname()):
            pass
    assert socket.getaddrinfo('localhost', 80)
    for host in ('192.0.2.1', '10.0.0.1', 'example.com'):
        with pytest.raises(NetworkBlocked):
            socket.create_connection((host, 80), timeout=1)
        with pytest.raises(NetworkBlocked):
            socket.getaddrinfo(host, 80)
    with socket.socket() as sock, pytest.raises(NetworkBlocked):
        sock.connect(('192.0.2.1', 80))


def test_without_the_marker_even_loopback_is_blocked():
    with socket.create_server(('127.0.0.1', 0)) as server:
        with pytest.raises(NetworkBlocked):
            socket.create_connection(server.getsockname())
        with socket.socket() as sock, pytest.raises(NetworkBlocked):
            sock.connect(server.getsockname())
    with pytest.raises(NetworkBlocked):
        socket.getaddrinfo('localhost', 80)


# --- end to end: the real server, the real page, a real browser -------------------------------------------------

@contextlib.contextmanager
def served(app, config=None):
    """`app` under uvicorn in a background thread, on a free port of 127.0.0.1 (with `config`, a
    uvicorn.Config around it, else uvicorn's defaults); yields its URL."""
    import uvicorn
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))   # the port is ours before the server starts: no race for a free one
    server = uvicorn.Server(config or uvicorn.Config(app, log_level='warning'))
    thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, 'uvicorn did not start'
        time.sleep(0.05)
    try:
        yield f'http://127.0.0.1:{sock.getsockname()[1]}/'
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def headless_chromium(profile_dir: Path):
    """Debian's Chromium through its chromedriver, with explicit paths so Selenium Manager never downloads."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
                 '--no-first-run', '--disable-background-networking', '--disable-component-update',
                 '--disable-sync', f'--user-data-dir={profile_dir}'):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.mark.loopback
def test_the_page_in_headless_chromium_shows_the_class_the_bars_and_the_errors(shipped_cnn, private_tmp, tmp_path):
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.skip(f'no browser for the end-to-end test: {", ".join(missing)} absent '
                    '(apt-get install chromium chromium-driver)')
    pytest.importorskip('selenium', reason='selenium is not installed: pip install -e .[test]')
    pytest.importorskip('uvicorn', reason='the web demo extra is not installed: pip install -e .[demo]')
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from flowers_fastai.app import create_app
    from flowers_fastai.submit import predict
    text_file = tmp_path / 'notes.txt'
    text_file.write_text('not a photo\n')
    with served(create_app(shipped_cnn, max_bytes=LIMIT)) as url, \
            headless_chromium(tmp_path / 'chromium-profile') as browser:
        browser.get(url)
        file_input = browser.find_element(By.ID, 'file')

        def upload(path: Path) -> str:
            """Pick `path` in the file input; what the page then shows: the class, else the error."""
            browser.execute_script("document.getElementById('result').hidden = true;"   # no stale answer
                                   "document.getElementById('error').textContent = '';")
            file_input.send_keys(str(path.resolve()))
            WebDriverWait(browser, 120).until(
                lambda b: b.find_element(By.ID, 'result-class').text or b.find_element(By.ID, 'error').text)
            return browser.find_element(By.ID, 'result-class').text or browser.find_element(By.ID, 'error').text

        rose = photo_of('rose')
        answer = predict(shipped_cnn, rose)   # the page shows the model's answer, right or wrong
        assert upload(rose) == answer
        rows = browser.find_elements(By.CSS_SELECTOR, '#probabilities .bar-row')
        assert [row.get_attribute('data-class') for row in rows] == CLASSES
        percents = [float(row.find_element(By.CLASS_NAME, 'pct').text.rstrip('%')) for row in rows]
        assert sum(percents) == pytest.approx(100, abs=0.5) and max(percents) == percents[CLASSES.index(answer)]

        assert 'notes.txt is not an image' in upload(text_file)
        assert upload(photo_of('sunflower')) == 'The file is too large: the limit is 30 KB.'
        assert upload(photo_of('daisy')) == predict(shipped_cnn, photo_of('daisy'))   # the page recovers after errors
    assert list(private_tmp.iterdir()) == []


# --- hostile clients and uploads ---------------------------------------------------------------------------------

@pytest.mark.parametrize('error', [KeyError('bad EXIF tag'), TypeError('unsupported operand'),
                                   RuntimeError('decoder crashed'), MemoryError()], ids=lambda e: type(e).__name__)
def test_any_decoder_error_of_an_upload_is_a_400_never_a_500(error, client, private_tmp, monkeypatch):
    """Crafted files make PIL's plugins raise errors outside the bad-input contract: still the upload's fault."""
    from PIL import Image

    def crafted(*args, **kwargs):
        raise error
    monkeypatch.setattr(Image, 'open', crafted)
    response = post_file(client, 'crafted.jpg', photo_of('rose').read_bytes())
    assert response.status_code == 400, response.text
    message = response.json()['error']
    assert 'crafted.jpg' in message and str(private_tmp) not in message
    assert list(private_tmp.iterdir()) == []


def test_the_demo_answers_400_for_an_unknown_dds_pixel_format(tiny_cnn_file, tmp_path):
    pytest.importorskip('starlette', reason='the web demo extra is not installed: pip install -e .[demo]')
    pytest.importorskip('multipart', reason='the web demo extra is not installed: pip install -e .[demo]')
    from starlette.testclient import TestClient

    from flowers_fastai.app import create_app
    data = dds_unknown_fourcc(tmp_path / 'texture.dds').read_bytes()
    with TestClient(create_app(load_cnn_model(tiny_cnn_file))) as client:
        for name in ('texture.dds', 'texture.jpg'):
            response = client.post('/predict', files={'file': (name, data, 'image/jpeg')})
            assert response.status_code == 400, response.text
            assert name in response.json()['error']
        ok = client.post('/predict', files={'file': ('rose.jpg', PHOTOS[0].read_bytes(), 'image/jpeg')})
        assert ok.status_code == 200 and ok.json()['class'] in CLASSES


def test_the_server_limits_are_options_with_defaults():
    pytest.importorskip('uvicorn', reason='the web demo extra is not installed: pip install -e .[demo]')
    from flowers_fastai import app
    for option in ('--upload-timeout', '--header-timeout', '--keep-alive', '--max-header-kb'):
        with pytest.raises(SystemExit) as stop:
            app.main([option, '0'])
        assert stop.value.code == 2, option
    config = app.server_config(None)
    assert config.h11_max_incomplete_event_size == app.DEFAULT_MAX_HEADER_KB * 1024
    assert config.timeout_keep_alive == app.DEFAULT_KEEP_ALIVE


def demo_server(app, **limits):
    """`served`, with the server limits `python -m flowers_fastai.app` runs with (`app.server_config`)."""
    pytest.importorskip('uvicorn', reason='the web demo extra is not installed: pip install -e .[demo]')
    from flowers_fastai import app as demo
    return served(app, demo.server_config(app, log_level='warning', **limits))


def port_of(url: str) -> int:
    return int(url.rstrip('/').rsplit(':', 1)[1])


def read_until_closed(sock: socket.socket, seconds: float = 3.0) -> bytes:
    """What the server sends until it closes the connection (a reset counts as closed), or within `seconds`."""
    sock.settimeout(seconds)
    data = b''
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def trickle_until_answered(sock: socket.socket, byte: bytes, give_up_after: float, watch=None) -> float | None:
    """Send `byte` every 0.1 s until the server answers or closes; the seconds that took, None if it still held
    the connection after `give_up_after`. `watch()` is called at each step."""
    import select
    start = time.monotonic()
    while time.monotonic() - start < give_up_after:
        if watch:
            watch()
        if select.select([sock], [], [], 0.1)[0]:
            return time.monotonic() - start
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
    return None


UPLOAD_HEAD = ('POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n'
               'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="file"; '
               'filename="slow.jpg"\r\nContent-Type: image/jpeg\r\n\r\n').encode()


@pytest.mark.loopback
def test_a_trickled_upload_is_stopped_at_the_upload_timeout_and_its_temp_folder_removed(private_tmp):
    from flowers_fastai.app import create_app
    timeout = 1.5
    folders_seen = set()
    with demo_server(create_app(None, upload_timeout=timeout), header_timeout=30) as url, \
            socket.create_connection(('127.0.0.1', port_of(url)), timeout=10) as sock:
        sock.sendall(UPLOAD_HEAD)
        took = trickle_until_answered(sock, b'\0', give_up_after=timeout + 6,
                                      watch=lambda: folders_seen.update(p.name for p in private_tmp.iterdir()))
        answer = read_until_closed(sock)
    assert folders_seen, 'the upload never reached its temp folder: the test did not test it'
    assert took is not None, f'the server still held a trickled upload after {timeout + 6} s'
    assert took < timeout + 2
    assert answer.startswith(b'HTTP/1.1 408') and b'took longer than 1.5 s' in answer
    assert list(private_tmp.iterdir()) == []      # the folder went with the answer


@pytest.mark.loopback
@pytest.mark.parametrize('behaviour', ['trickled head', 'silent'])
def test_a_request_head_that_does_not_arrive_in_time_loses_its_connection(behaviour):
    from flowers_fastai.app import create_app
    timeout = 1.0
    with demo_server(create_app(None), header_timeout=timeout) as url, \
            socket.create_connection(('127.0.0.1', port_of(url)), timeout=10) as sock:
        if behaviour == 'trickled head':
            sock.sendall(b'POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ')
            took = trickle_until_answered(sock, b'z', give_up_after=timeout + 6)
        else:
            took = trickle_until_answered(sock, b'', give_up_after=timeout + 6)
        answer = read_until_closed(sock)
    assert took is not None, f'the server still held the connection after {timeout + 6} s'
    assert took < timeout + 2 and answer == b''


@pytest.mark.loopback
def test_a_50_mb_header_is_refused_quickly_without_being_buffered():
    import tracemalloc

    from flowers_fastai.app import create_app
    limit, chunk = 50 * 2 ** 20, b'a' * 65536
    with demo_server(create_app(None)) as url, \
            socket.create_connection(('127.0.0.1', port_of(url)), timeout=10) as sock:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            sock.sendall(b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ')
            start, sent, refused = time.monotonic(), 0, False
            try:
                while sent < limit:
                    sock.sendall(chunk)
                    sent += len(chunk)
                sock.sendall(b'\r\n\r\n')
            except (BrokenPipeError, ConnectionResetError):
                refused = True
            except TimeoutError:   # the server is still reading it, slowly: not refused
                pass
            took = time.monotonic() - start
            grown = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        answer = read_until_closed(sock)
    assert refused and sent < limit, f'the server took a {sent / 2 ** 20:.0f} MB header'
    assert took < 5
    assert answer == b'' or answer.startswith((b'HTTP/1.1 400', b'HTTP/1.1 431'))
    assert grown < 8 * 2 ** 20, f'the server buffered {grown / 2 ** 20:.0f} MB of it'


# ------------------------------------------------------------------------------------------ memory budget
def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = 'flowersboundary'
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            'Content-Type: image/png\r\n\r\n').encode() + data + f'\r\n--{boundary}--\r\n'.encode()
    return body, f'multipart/form-data; boundary={boundary}'


def _post(url: str, name: str, data: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request
    body, content_type = _multipart(name, data)
    request = urllib.request.Request(url + 'predict', data=body, headers={'Content-Type': content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _large_png(side: int) -> bytes:
    """A small file (a few KB) that decodes to side x side pixels: what a hostile upload does."""
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new('RGB', (side, side), (200, 40, 90)).save(buffer, 'PNG')
    return buffer.getvalue()


@pytest.mark.loopback
def test_concurrent_large_uploads_stay_within_the_memory_budget(tiny_cnn_file, private_tmp, monkeypatch):
    """Six uploads of small files that each decode to 9 Mpx (~100 MB while processed), all at once, against a
    budget that fits two: every one is answered, and the decodes in flight never exceed the budget (counted
    independently of the app: the pixels of the photos inside predict_proba at the same time)."""
    from PIL import Image

    from flowers_fastai import app as demo
    from flowers_fastai.submit import load_cnn_model
    side, uploads = 3000, 6
    per_upload = demo.DECODE_OVERHEAD + demo.DECODE_BYTES_PER_PIXEL * side * side
    budget = int(2.5 * per_upload)
    lock, inside = threading.Lock(), []
    peak = [0]
    real = demo.predict_proba

    def watched(model, path):
        with Image.open(path) as img:
            pixels = img.width * img.height
        with lock:
            inside.append(pixels)
            peak[0] = max(peak[0], demo.DECODE_OVERHEAD * len(inside) + demo.DECODE_BYTES_PER_PIXEL * sum(inside))
        try:
            time.sleep(0.3)   # long enough for every upload to be waiting meanwhile
            return real(model, path)
        finally:
            with lock:
                inside.remove(pixels)
    monkeypatch.setattr(demo, 'predict_proba', watched)
    app = demo.create_app(load_cnn_model(tiny_cnn_file), max_memory=budget)
    data = _large_png(side)
    assert len(data) < 100_000
    with served(app) as url:
        results = [None] * uploads
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _post(url, f'{i}.png', data)))
                   for i in range(uploads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    assert [status for status, _ in results] == [200] * uploads, results
    assert peak[0] > per_upload             # uploads did run side by side
    assert peak[0] <= budget, f'{peak[0] / 2 ** 20:.0f} MB of decodes in flight over a budget of {budget / 2 ** 20:.0f} MB'
    assert app.state.memory.peak <= budget and app.state.memory.in_use == 0


def test_an_upload_whose_decoding_alone_exceeds_the_budget_is_413_before_decoding(tiny_cnn_file, private_tmp,
                                                                                  model_calls):
    from flowers_fastai.submit import load_cnn_model
    with demo_client(load_cnn_model(tiny_cnn_file), max_memory=64 * 2 ** 20) as client:
        answer = post_file(client, 'big.png', _large_png(4000), 'image/png')   # 16 Mpx: ~160 MB
        small = post_file(client, 'small.png', _large_png(500), 'image/png')
    assert answer.status_code == 413 and '4000x4000' in answer.json()['error'] and 'budget' in answer.json()['error']
    assert small.status_code == 200
    assert [path.name for path, _ in model_calls] == ['upload']   # the large one never reached the model


@pytest.mark.loopback
def test_the_header_limit_holds_for_a_head_that_arrives_at_once():
    """h11's limit applies to a head still arriving: a 80 KB head sent in one piece passed a 64 KB limit."""
    from flowers_fastai.app import create_app
    with demo_server(create_app(None)) as url, \
            socket.create_connection(('127.0.0.1', port_of(url)), timeout=10) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ' + b'a' * 80 * 1024 + b'\r\n\r\n')
        answer = read_until_closed(sock)
    assert answer.startswith((b'HTTP/1.1 431', b'HTTP/1.1 400')), answer[:100]
    with demo_server(create_app(None)) as url, \
            socket.create_connection(('127.0.0.1', port_of(url)), timeout=10) as sock:
        sock.sendall(b'GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ' + b'a' * 60 * 1024 + b'\r\nConnection: close\r\n\r\n')
        answer = read_until_closed(sock)
    assert answer.startswith(b'HTTP/1.1 200')   # under the limit: served


@pytest.mark.parametrize('options', [['--port', '99999'], ['--port', '0'], ['--port', '-1'], ['--max-mb', '1e-9'],
                                     ['--max-header-kb', '0.0001'], ['--max-mb', 'inf'], ['--max-memory-mb', '1']])
def test_options_that_cannot_serve_are_refused_with_one_sentence(options, monkeypatch, capsys):
    pytest.importorskip('uvicorn', reason='the web demo extra is not installed: pip install -e .[demo]')
    from flowers_fastai import app

    def accepted(*args, **kwargs):
        pytest.fail(f'{options} was accepted: the model was loading')
    monkeypatch.setattr(app, 'load_chosen_model', accepted)
    with pytest.raises(SystemExit) as stop:
        app.main(options)
    assert stop.value.code == 2
    assert options[0] in capsys.readouterr().err
