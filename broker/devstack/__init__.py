"""The local development stack (`broker dev`) and the process helpers tests share with it."""
