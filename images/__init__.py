"""The job image: its Dockerfile, pinned requirements and the registry-free local build."""
