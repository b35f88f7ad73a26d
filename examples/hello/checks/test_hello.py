"""A project's own smoke check: `fab check` runs every test_*.py in the
folder named by app.checks (default: checks/ in the app source) beside the built-in ones."""


def test_hello_answers_its_greeting(host, app):
    out = host.check_output(
        "python3 -c %s",
        "import urllib.request as u; print(u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1/').read().decode())",
    )
    assert "Hello" in out
