"""microsvc.config.values: the parsers behind every option."""

from __future__ import annotations

import pytest

from microsvc.config.values import (
    format_size,
    parse_auto_or_positive_int,
    parse_bind,
    parse_bool,
    parse_ip_list,
    parse_non_negative_int,
    parse_positive_int,
    parse_size,
    split_bind,
)

# --- parse_size ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MB", 512_000_000),
        ("512MiB", 512 * 1024**2),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("1GB", 1_000_000_000),
        ("64KiB", 65536),
        ("2k", 2000),
        ("10B", 10),
        ("536870912", 536870912),
        (" 256 mib ", 256 * 1024**2),
        ("0.5KiB", 512),
        (1024, 1024),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["512XB", "1TB", "12 bytes", "5mbit"])
def test_parse_size_rejects_unknown_units(text: str) -> None:
    with pytest.raises(ValueError, match="unknown unit"):
        parse_size(text)


@pytest.mark.parametrize("value", ["", "abc", "-1", "MB", "1,5GB", "1e3", None, 1.5, True])
def test_parse_size_rejects_non_sizes(value: object) -> None:
    with pytest.raises(ValueError, match="not a size such as"):
        parse_size(value)


@pytest.mark.parametrize("value", ["0", 0, "0MB", "0.1", -5])
def test_parse_size_rejects_zero(value: object) -> None:
    with pytest.raises(ValueError, match="above zero"):
        parse_size(value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (100, "100B"),
        (1024, "1KiB"),
        (1536, "1.5KiB"),
        (128 * 1024**2, "128MiB"),
        (3 * 1024**3 // 2, "1.5GiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


# --- parse_bind ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:5000",
        "localhost:8080",
        "my-host.example.com:443",
        "0.0.0.0:0",
        "0.0.0.0:65535",
        "[::1]:80",
        "[::]:8000",
        ":8000",
        "unix:/tmp/x.sock",
        "unix:relative.sock",
        "fd://3",
        "fd://0",
    ],
)
def test_parse_bind_accepts(text: str) -> None:
    assert parse_bind(text) == text


def test_parse_bind_strips_spaces() -> None:
    assert parse_bind("  127.0.0.1:80 \n") == "127.0.0.1:80"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost", "has no port"),
        ("garbage", "has no port"),
        ("localhost:70000", "not a number from 0 to 65535"),
        ("localhost:65536", "not a number from 0 to 65535"),
        ("localhost:", "not a number from 0 to 65535"),
        ("localhost:http", "not a number from 0 to 65535"),
        ("localhost:-1", "not a number from 0 to 65535"),
        ("::1:80", r"brackets, \[::1\]:PORT"),
        ("fe80::1", r"brackets, \[::1\]:PORT"),
        ("[::1]", r"not \[IPv6\]:PORT"),
        ("[::1]80", r"not \[IPv6\]:PORT"),
        ("[localhost]:80", "is not an IPv6 address"),
        ("[::1]:99999", "not a number from 0 to 65535"),
        ("bad host:80", "is not a host name or address"),
        ("h@st:80", "is not a host name or address"),
        ("unix:", "names no socket path"),
        ("fd://", "not an integer >= 0"),
        ("fd://x", "not an integer >= 0"),
        ("fd://-1", "not an integer >= 0"),
        ("", "is not an address"),
        ("   ", "is not an address"),
        (None, "is not an address"),
        (8000, "is not an address"),
    ],
)
def test_parse_bind_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_bind(value)


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("[::1]:80", ("::1", 80)),
        (":8000", ("0.0.0.0", 8000)),
        ("unix:/tmp/x.sock", None),
        ("fd://3", None),
    ],
)
def test_split_bind(bind: str, expected: tuple[str, int] | None) -> None:
    assert split_bind(bind) == expected


# --- integers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), (" Auto ", "auto"), ("3", 3), (" 12 ", 12), (1, 1)],
)
def test_parse_auto_or_positive_int(value: object, expected: object) -> None:
    assert parse_auto_or_positive_int(value) == expected


@pytest.mark.parametrize("value", ["0", 0, -2, "-2", "x", "", "2.5", 2.5, True, None, "automatic"])
def test_parse_auto_or_positive_int_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="'auto' or an integer >= 1"):
        parse_auto_or_positive_int(value)


def test_parse_positive_int() -> None:
    assert parse_positive_int("7") == 7
    with pytest.raises(ValueError, match="an integer >= 1"):
        parse_positive_int(0)


def test_parse_non_negative_int() -> None:
    assert parse_non_negative_int("0") == 0
    assert parse_non_negative_int(30) == 30
    for bad in (-1, "-1", "ten", False):
        with pytest.raises(ValueError, match="an integer >= 0"):
            parse_non_negative_int(bad)


# --- parse_bool --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, "1", "true", "TRUE", " yes ", "on", "On"])
def test_parse_bool_true(value: object) -> None:
    assert parse_bool(value) is True


@pytest.mark.parametrize("value", [False, "0", "false", "False", "no", "off", "", "  "])
def test_parse_bool_false(value: object) -> None:
    assert parse_bool(value) is False


@pytest.mark.parametrize("value", ["maybe", "2", "enabled", None, 2.0])
def test_parse_bool_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="is not a boolean"):
        parse_bool(value)


# --- parse_ip_list -----------------------------------------------------------------------


def test_parse_ip_list_accepts_addresses_networks_and_star() -> None:
    assert parse_ip_list(" 10.0.0.0/8, ::1,*,") == ("10.0.0.0/8", "::1", "*")
    assert parse_ip_list(["192.168.1.1", "fd00::/8"]) == ("192.168.1.1", "fd00::/8")


@pytest.mark.parametrize(
    ("text", "network"),
    [("10.0.0.1/8", "10.0.0.0/8"), ("192.168.1.1/24", "192.168.1.0/24"), ("fd00::1/8", "fd00::/8")],
)
def test_parse_ip_list_refuses_host_bits_as_gunicorn_does(text: str, network: str) -> None:
    from gunicorn.config import Config

    with pytest.raises(ValueError, match=f"has host bits set; the network is {network}"):
        parse_ip_list(text)
    with pytest.raises(ValueError):
        Config().set("forwarded_allow_ips", text)


@pytest.mark.parametrize("text", ["10.0.0.0/33", "bogus", "10.0.0.0/8/8", "1.2.3"])
def test_parse_ip_list_refuses_non_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="is not an IP address or network"):
        parse_ip_list(text)
