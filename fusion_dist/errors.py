"""The one exception type for bad user input (files, fields, config keys).

Commands raise ``UserError`` with a message naming the file, the field and the problem; the CLI
prints it as one line and exits 2. Kept dependency-free so ``data_prep`` can use it without torch.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""
