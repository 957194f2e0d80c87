"""A real S3 server on loopback, for the tests and the bench's object-store rows: moto's server
mode (ThreadedMotoServer, in the dev extra), with dummy credentials and its own AWS config files,
so that no request leaves 127.0.0.1."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def loopback_s3(config_dir: Path):
    """Starts the server; sets the variables boto3 and streaming's S3 downloader read (in this
    process, and so in every process it starts) and puts them back at the end. Yields the
    endpoint URL."""
    from moto.server import ThreadedMotoServer  # lazy: a test/bench dependency, not the trainer's

    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config").write_text("[default]\nregion = us-east-1\n")
    (config_dir / "credentials").write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    variables = {
        "S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(config_dir / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
    }
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client():
    import boto3  # lazy: only remote datasets need it (streaming's S3 downloader imports it too)

    return boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])


def upload(local: Path, bucket: str, prefix: str) -> str:
    """Copies a local dataset directory into the bucket (created if needed); returns its URL."""
    s3 = client()
    if bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=bucket)
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local)}")
    return f"s3://{bucket}/{prefix}"
