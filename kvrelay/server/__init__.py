"""Running a real tritonserver (repository, process, supervision) and talking to it (client, query, demo)."""
