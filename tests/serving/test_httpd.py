"""The HTTP plumbing of the REST API and the page: Host check, connection cap, failures."""

import http.client
import json
import socket
import time

import pytest

from serving import httpd


class _Echo(httpd.Handler):
    def get(self):
        self.send_json(200, {"path": self.path})


@pytest.fixture
def server():
    made = []

    def make(host="127.0.0.1", **kwargs):
        made.append(httpd.Server((host, 0), _Echo, "test", **kwargs))
        made[-1].start()
        return made[-1]

    yield make
    for s in made:
        s.shutdown()
        s.server_close()


def _get(port, host_header=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.putrequest("GET", "/x", skip_host=host_header is not None)
    if host_header is not None:
        connection.putheader("Host", host_header)
    connection.endheaders()
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


@pytest.mark.parametrize("host, status", [
    ("localhost:8080", 200), ("127.0.0.1", 200), ("[::1]:8080", 200), ("LOCALHOST", 200),
    ("attacker.example:8080", 403), ("127.0.0.1.attacker.example", 403), ("", 403),
])
def test_a_loopback_server_answers_loopback_host_names_only(server, host, status):
    # A page whose DNS name is rebound to 127.0.0.1 sends its own name as Host: it must not read the answers.
    got, body = _get(server().port, host)
    assert got == status
    if status == 403:
        assert "allowed_hosts" in json.loads(body)["error"]


def test_allowed_hosts_widen_the_check(server):
    port = server(allowed_hosts=["search.example"]).port
    assert _get(port, "search.example:80")[0] == 200
    assert _get(port, "localhost")[0] == 403  # the list replaces the default
    assert _get(server(allowed_hosts=["*"]).port, "anything.example")[0] == 200


def test_connections_past_the_cap_get_503_and_the_server_keeps_serving(server):
    s = server(max_connections=2)
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(2)]  # two threads held, silent
    time.sleep(0.2)
    third = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    assert third.recv(100).startswith(b"HTTP/1.1 503")
    third.close()
    for connection in idle:
        connection.close()
    deadline = time.time() + 10
    while time.time() < deadline:  # the held threads see the closes and end
        try:
            if _get(s.port)[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    assert _get(s.port)[0] == 200


@pytest.mark.parametrize("length, status", [(None, 411), ("\u00b2", 400), ("-5", 400), ("99999999999999999999", 400),
                                            ("2000", 413)])
def test_content_length_is_checked_before_the_body(server, length, status):
    class Post(httpd.Handler):
        def post(self):
            if self.content_length(1000) is not None:
                self.send_json(200, {})

    s = httpd.Server(("127.0.0.1", 0), Post, "test")
    s.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        connection.putrequest("POST", "/")
        if length is not None:
            connection.putheader("Content-Length", length)
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == status and json.loads(response.read())["error"]
    finally:
        s.shutdown()
        s.server_close()


def test_a_body_trickled_past_its_deadline_gets_408(server):
    class Post(httpd.Handler):
        body_seconds = 1.5

        def post(self):
            length = self.content_length(1000)
            if length is not None and self.read_body(length) is not None:
                self.send_json(200, {})

    s = httpd.Server(("127.0.0.1", 0), Post, "test")
    s.start()
    try:
        connection = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        connection.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
        start, answer = time.monotonic(), b""
        connection.settimeout(0.3)
        while time.monotonic() - start < 8 and not answer:  # a byte every 0.3 s: each read is quick, the whole is not
            try:
                connection.sendall(b"x")
                answer = connection.recv(200)
            except TimeoutError:
                pass
            except OSError:
                break
        connection.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        s.shutdown()
        s.server_close()
