"""De-identification (issue 3): project profiles, project-hashed UIDs. Not built yet."""
