"""The broker's MCP server (``broker mcp``): credentials for agents that speak MCP.

Needs the optional ``mcp`` package: ``pip install 'broker[mcp]'``.
"""
