"""The command line: the parser, and one module a group of commands.
"""
