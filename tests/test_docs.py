"""The documentation keeps up with the code: every setting is documented, and README's
top (before the first map of links) fits on one screen."""

from pathlib import Path

from fedprune.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_in_the_settings_table():
    table = (ROOT / "docs" / "settings.md").read_text()
    missing = [k for k in Settings().to_run_config() if f"`{k}`" not in table]
    assert not missing, f"docs/settings.md lacks {missing}"


def test_readme_top_fits_on_one_screen_and_links_the_docs():
    readme = (ROOT / "README.md").read_text()
    top = readme.split("\n## Where to go next", 1)[0]
    assert len(top.splitlines()) <= 60, len(top.splitlines())
    for doc in ("docs/settings.md", "docs/running.md", "docs/deployment.md", "docs/extending.md"):
        assert doc in readme
        assert (ROOT / doc).is_file()
