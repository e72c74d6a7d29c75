"""``import seqpack`` refuses torch / transformers older than the tested floors with a message that says what to
install; the installed releases pass."""

import pytest

from seqpack.versions import FLOORS, check_versions, release


def test_release_parses_local_and_dev_versions():
    assert release("2.11.0+cu130") == (2, 11)
    assert release("5.24.0.dev0") == (5, 24)
    assert release("2.13.0a0+git123") == (2, 13)
    assert release("5.23") == (5, 23)


def test_installed_releases_pass():
    check_versions()


def test_older_releases_are_refused_with_the_fix():
    with pytest.raises(ImportError,
                       match=r"transformers 5\.17\.0 \(needs >= 5\.23\).*pip install -U 'transformers>=5\.23'"):
        check_versions({"torch": "2.11.0+cu130", "transformers": "5.17.0"})
    with pytest.raises(ImportError, match=r"torch 2\.8\.0 \(needs >= 2\.9\), transformers 5\.0\.0"):
        check_versions({"torch": "2.8.0", "transformers": "5.0.0"})
    check_versions({"torch": "2.9.1", "transformers": "5.23.0"})  # the floors themselves


def test_floors_match_pyproject():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text()
    for name, (major, minor) in FLOORS.items():
        assert re.search(rf'"{name}>={major}\.{minor}"', text), name
