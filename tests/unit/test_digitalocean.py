"""The digitalocean provider against API responses written from DigitalOcean's API reference
(tests/unit/data/digitalocean; no real API call is made here): the real
pydo client, its requests reaching a requests adapter mounted in its HTTP transport, which answers
from those bodies and records what was asked. Nothing leaves the process."""

import io
import json
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import urllib3
from azure.core.pipeline.transport import RequestsTransport
from invoke.util import yaml

from provision import droplets as plan, secrets
from provision.errors import ProvisionError
from provision.providers import Droplet, Spec
from provision.providers.digitalocean import DigitalOcean, new_host_key

DATA = Path(__file__).parent / "data" / "digitalocean"
TOKEN = "dop_v1_" + "5ec7e7" * 10  # a made-up token: it must reach the API's header, never a line
API = "api.digitalocean.com"


class Recorded(requests.adapters.HTTPAdapter):
    """DigitalOcean's API as its reference documents it: each request takes the next answer for its method and path."""

    def __init__(self, answers: list[tuple[str, str, int, str | None]]):
        super().__init__()
        self.answers = list(answers)
        self.asked: list[dict] = []

    def send(self, request, **kwargs):
        url = urlsplit(request.url)
        assert (url.scheme, url.hostname) == ("https", API), f"a request outside the recorded API: {request.url}"
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        self.asked.append({"method": request.method, "path": url.path, "query": parse_qs(url.query),
                           "body": json.loads(body) if body else None,
                           "authorization": request.headers.get("Authorization"), "timeout": kwargs.get("timeout")})
        for i, (method, path, status, name) in enumerate(self.answers):
            if (method, path) == (request.method, url.path):
                del self.answers[i]
                break
        else:
            raise AssertionError(f"no recorded answer left for {request.method} {url.path}")
        content = (DATA / name).read_bytes() if name else b""
        raw = urllib3.HTTPResponse(body=io.BytesIO(content), status=status, preload_content=False,
                                   reason=requests.status_codes._codes[status][0].replace("_", " ").title(),
                                   headers={"Content-Type": "application/json; charset=utf-8",
                                            "Content-Length": str(len(content))})
        return self.build_response(request, raw)  # as requests' own adapter does with what urllib3 read


def provider(answers, sleeps=None, **kwargs) -> tuple[DigitalOcean, Recorded]:
    api = Recorded(answers)
    session = requests.Session()
    session.mount("https://", api)
    session.mount("http://", api)
    clock = iter(range(0, 10_000, 3))
    p = DigitalOcean(TOKEN, sleep=(sleeps.append if sleeps is not None else lambda s: None),
                     clock=lambda: next(clock), transport=RequestsTransport(session=session, session_owner=False),
                     **{"retry_total": 0, **kwargs})
    return p, api


def test_create_sends_the_user_data_and_waits_until_active_with_an_address():
    private, public = new_host_key()
    text = plan.user_data("deploy", ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEvWo2fU4JEprQPJEGN43M6ct7tANUK8A1AHp0zF88jk"],
                          (private, public))
    sleeps: list = []
    p, api = provider([("POST", "/v2/droplets", 202, "create_202.json"),
                       ("GET", "/v2/droplets/3164444", 200, "get_new.json"),
                       ("GET", "/v2/droplets/3164444", 200, "get_new.json"),
                       ("GET", "/v2/droplets/3164444", 200, "get_active.json")], sleeps)
    d = p.create(Spec(name="web1", user_data=text, region="fra1"))
    assert d == Droplet(name="web1", id="3164444", provider="digitalocean", address=None, status="new",
                        size="s-1vcpu-1gb", region="fra1")
    d = p.wait_ready(d, timeout=300, interval=5)
    assert (d.address, d.status) == ("203.0.113.10", "active")  # the public address, not the private one
    assert sleeps == [5, 5] and not api.answers
    create = api.asked[0]
    assert create["authorization"] == f"Bearer {TOKEN}"
    assert create["body"] == {"name": "web1", "size": "s-1vcpu-1gb", "region": "fra1", "image": "debian-12-x64",
                              "user_data": text, "tags": ["provision"], "monitoring": True, "ipv6": False}
    assert yaml.safe_load(create["body"]["user_data"])["ssh_keys"]["ed25519_public"] == public


def test_wait_ready_is_bounded():
    p, api = provider([("GET", "/v2/droplets/3164444", 200, "get_new.json")] * 30)
    with pytest.raises(ProvisionError, match=r"droplet web1 not active after 9s \(status 'new'\)") as e:
        p.wait_ready(Droplet("web1", "3164444", "digitalocean"), timeout=9, interval=3)
    assert e.value.code == 1 and len(api.asked) < 30


def test_list_walks_the_pages_of_the_provision_tag():
    p, api = provider([("GET", "/v2/droplets", 200, "list_page1.json"), ("GET", "/v2/droplets", 200, "list_page2.json")] * 2)
    out = p.list()
    assert [(d.name, d.address, d.status) for d in out] == [("web1", "203.0.113.10", "active"), ("web2", None, "new")]
    assert [a["query"] for a in api.asked] == [{"tag_name": ["provision"], "per_page": ["200"], "page": [str(n)]}
                                               for n in (1, 2)]
    assert p.get("web2").id == "3164450"


def test_several_droplets_of_one_name_are_refused(tmp_path, monkeypatch):
    page = json.loads((DATA / "list_page1.json").read_text())
    page["droplets"].append(dict(page["droplets"][0], id=3164999))
    page["links"] = {}
    (tmp_path / "twice.json").write_text(json.dumps(page))
    monkeypatch.setattr(sys.modules[__name__], "DATA", tmp_path)
    p, _ = provider([("GET", "/v2/droplets", 200, "twice.json")])
    with pytest.raises(ProvisionError, match=r"digitalocean has 2 droplets named 'web1' \(ids 3164444, 3164999\)"):
        p.get("web1")


def test_destroy_deletes_by_id():
    p, api = provider([("DELETE", "/v2/droplets/3164444", 204, None)])
    p.destroy(Droplet("web1", "3164444", "digitalocean"))
    assert [(a["method"], a["path"]) for a in api.asked] == [("DELETE", "/v2/droplets/3164444")]


def test_a_401_is_one_line_naming_the_token_variable_never_the_token():
    p, _ = provider([("POST", "/v2/droplets", 401, "error_401.json")])
    with pytest.raises(ProvisionError) as e:
        p.create(Spec(name="web1", user_data="#cloud-config\n"))
    assert str(e.value) == ("digitalocean: creating droplet web1: 401 unauthorized: Unable to authenticate you; "
                            "check DIGITALOCEAN_TOKEN (a token with write scope, from the control panel's API page)")
    assert e.value.code == 2 and "\n" not in str(e.value)
    assert secrets.mask(f"header Bearer {TOKEN}") == "header Bearer ****"  # registered: masked wherever it shows


def test_a_422_names_what_to_fix():
    p, _ = provider([("POST", "/v2/droplets", 422, "error_422.json")])
    with pytest.raises(ProvisionError, match=r"^digitalocean: creating droplet web1: 422 unprocessable_entity: "
                                             r"You specified an invalid size for Droplet creation\.; fix --size"):
        p.create(Spec(name="web1", user_data="#cloud-config\n", size="s-99"))


def test_an_error_echoing_the_token_is_masked(tmp_path, monkeypatch):
    echo = tmp_path / "echo.json"
    echo.write_text(json.dumps({"id": "unauthorized", "message": f"token {TOKEN} is not valid"}))
    monkeypatch.setattr(sys.modules[__name__], "DATA", tmp_path)
    p, _ = provider([("GET", "/v2/droplets", 401, "echo.json")])
    with pytest.raises(ProvisionError) as e:
        p.list()
    assert TOKEN not in str(e.value) and "token **** is not valid" in str(e.value)


def test_no_token_or_no_client_is_one_line(monkeypatch):
    with pytest.raises(ProvisionError, match="^set DIGITALOCEAN_TOKEN to a DigitalOcean API token"):
        DigitalOcean.from_environment(environ={})
    monkeypatch.setitem(sys.modules, "pydo", None)  # as if not installed
    with pytest.raises(ProvisionError, match=r"^the digitalocean provider needs its client: "
                                             r"pip install 'provision\[digitalocean\]'$"):
        DigitalOcean.from_environment(environ={"DIGITALOCEAN_TOKEN": TOKEN})


@pytest.mark.parametrize("status", [500, 503, 504])
def test_a_create_post_is_never_retried_and_a_5xx_says_a_droplet_may_exist(status):
    p, api = provider([("POST", "/v2/droplets", status, None)] * 4, retry_total=3, retry_backoff_factor=0)
    with pytest.raises(ProvisionError) as e:
        p.create(Spec(name="web1", user_data="#cloud-config\n"))
    assert [a["method"] for a in api.asked] == ["POST"]
    assert str(e.value).endswith("; a droplet may have been created all the same (and costs): fab droplet.list "
                                 "--provider digitalocean") and TOKEN not in str(e.value)


def test_a_create_post_timing_out_says_a_droplet_may_exist():
    class TimedOut(Recorded):
        def send(self, request, **kwargs):
            super().send(request, **kwargs)
            raise requests.exceptions.ReadTimeout("read timed out")

    api = TimedOut([("POST", "/v2/droplets", 202, "create_202.json")] * 4)
    session = requests.Session()
    session.mount("https://", api)
    p = DigitalOcean(TOKEN, transport=RequestsTransport(session=session, session_owner=False), retry_backoff_factor=0)
    with pytest.raises(ProvisionError) as e:
        p.create(Spec(name="web1", user_data="#cloud-config\n"))
    assert len(api.asked) == 1 and e.value.code == 3 and "a droplet may have been created" in str(e.value)


def test_a_refused_create_says_nothing_was_made():
    p, api = provider([("POST", "/v2/droplets", 422, "error_422.json")])
    with pytest.raises(ProvisionError) as e:
        p.create(Spec(name="web1", user_data="#cloud-config\n"))
    assert e.value.code == 2 and "may have been created" not in str(e.value)


def test_requests_are_bounded_and_wait_ready_checks_its_deadline_before_each_poll():
    p, api = provider([("GET", "/v2/droplets/3164444", 200, "get_new.json")] * 30)
    with pytest.raises(ProvisionError, match=r"not active after 9s"):
        p.wait_ready(Droplet("web1", "3164444", "digitalocean"), timeout=9, interval=3)
    assert [a["timeout"] for a in api.asked] == [(10, 6), (10, 3)]  # the clock: +3 a read
    p, api = provider([("GET", "/v2/droplets", 200, "list_page1.json"), ("GET", "/v2/droplets", 200, "list_page2.json"),
                       ("POST", "/v2/droplets", 202, "create_202.json")])
    p.list()
    p.create(Spec(name="web1", user_data="#cloud-config\n"))
    assert [a["timeout"] for a in api.asked] == [(10, 30)] * 3  # azure-core's default: 300 s each


def test_list_dedupes_by_id_and_refuses_more_than_max_pages(monkeypatch):
    import provision.providers.digitalocean as do

    p, api = provider([("GET", "/v2/droplets", 200, "list_page1.json"), ("GET", "/v2/droplets", 200, "list_page1.json"),
                       ("GET", "/v2/droplets", 200, "list_page2.json")])
    ids = [d.id for d in p.list()]
    assert len(ids) == len(set(ids)) and len(api.asked) == 3
    monkeypatch.setattr(do, "MAX_PAGES", 2)
    p, api = provider([("GET", "/v2/droplets", 200, "list_page1.json")] * 2)
    with pytest.raises(ProvisionError, match="more than 2 pages of droplets tagged 'provision'"):
        p.list()
