"""Load generators (chat, HTTP) and the history checkers that judge their runs."""
