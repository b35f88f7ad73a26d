from provision.sandbox import _pem_blocks


def test_pem_blocks_split_and_normalise():
    a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----"
    b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----"
    text = f"# comment\n{a}\n\n{b}\ntrailing garbage\n"
    assert _pem_blocks(text) == [a + "\n", b + "\n"]
    assert _pem_blocks("") == []
