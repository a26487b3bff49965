from typing import Any

class WGConfig:
    def __init__(self, file: str | None = None, *args: Any, **kwargs: Any) -> None: ...
    # The values: a list of one int for a number, else the comma-separated strings.
    @staticmethod
    def parse_line(line: str) -> tuple[str, list[Any], str]: ...
