"""`edgemesh deploy`: filled by its issue."""

from edgemesh.cli._common import not_yet

command = not_yet("deploy")
