"""The option table: the command line and Config come from it, defaults written once."""

import dataclasses

import pytest

from shmcache.config import FIELDS, OPTIONS, Config, build_parser, parse_args
from shmcache.supervisor import Config as SupervisorConfig, parse_args as supervisor_parse_args

pytestmark = pytest.mark.unit


def test_every_config_field_is_one_option_and_the_supervisor_names_stay():
    assert [field.name for field in dataclasses.fields(Config)] == list(FIELDS)
    assert len({option.flag for option in OPTIONS}) == len(OPTIONS)
    assert SupervisorConfig is Config and supervisor_parse_args is parse_args


def test_an_empty_command_line_gives_the_defaults(monkeypatch):
    monkeypatch.delenv("SHMCACHE_TOKEN", raising=False)
    assert parse_args([]) == Config()
    assert Config().memory == 256 << 20 and Config().max_item_size == 1 << 20
    assert Config().name == "kcache-8001" and Config().self_url == "http://127.0.0.1:8001"


def test_help_describes_every_option_with_its_default():
    text = " ".join(build_parser().format_help().split())
    for option in OPTIONS:
        assert option.flag in text
        assert option.help_text()
    for shown in ("worker processes (default 4)", "arena size (default 256MiB)",
                  "(default 0.1)", "longest key accepted (default 250)", "(default 0.5)"):
        assert shown in text


def test_values_are_converted_and_checked(capsys):
    config = parse_args(["--memory", "64MiB", "--peers", "http://a:1,,http://b:2",
                         "--self", "http://a:1", "--port", "9000"])
    assert config.memory == 64 << 20 and config.peers == ("http://a:1", "http://b:2")
    assert config.name == "kcache-9000" and config.self_explicit
    for argv, message in ((["--threads", "0"], "--workers and --threads must be at least 1"),
                          (["--max-key-bytes", "251"], "--max-key-bytes must be 1..250"),
                          (["--memory", "lots"], "not a byte size")):
        with pytest.raises(SystemExit) as exit:
            parse_args(argv)
        assert exit.value.code == 2 and message in capsys.readouterr().err
