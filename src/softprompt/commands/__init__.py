"""What each CLI command does: its arguments in, the engines called, files and messages out.

The engines (``training``, ``generation``, ``measure``, ``serving``, ``integrations``) never
parse flags or print a command's report; the modules here do, one per command.
"""
