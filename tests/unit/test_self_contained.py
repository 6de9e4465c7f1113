"""The project stands on its own: no file cites notes that live outside the repository."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Spelled in pieces, so that this file does not cite them either.
OUTSIDE_NOTES = ("facts" + ".md", "shared" + "/notes")
SKIP = {".venv", ".image-venv", "build", ".git", "__pycache__", "node_modules", ".pytest_cache"}


def test_no_file_cites_notes_outside_the_repository():
    citing = []
    for path in REPO.rglob("*"):
        if not path.is_file() or SKIP & set(path.relative_to(REPO).parts[:-1]):
            continue
        if path.suffix not in {".py", ".md", ".sh", ".toml", ".cfg", ".def", ".j2", ".txt", ".yaml", ""}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        citing += [f"{path.relative_to(REPO)}: {note}" for note in OUTSIDE_NOTES if note in text]
    assert citing == []
