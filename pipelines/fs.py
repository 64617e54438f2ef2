"""A thin wrapper over Hadoop's FileSystem through the Spark JVM.

Going through Hadoop (rather than ``os``/``pathlib``) keeps the job's paths valid on every cluster
storage Spark reaches: local disk, HDFS, ``s3a://``, ``gs://``, ``abfs://``.
"""

from __future__ import annotations

from typing import Any

from pyspark.sql import SparkSession


class HadoopFS:
    def __init__(self, spark: SparkSession, any_path: str) -> None:
        jvm = spark.sparkContext._jvm
        assert jvm is not None, "HadoopFS needs an active SparkContext"
        self._jvm = jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()
        self._fs = self._path(any_path).getFileSystem(self._conf)

    def _path(self, p: str) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(p)

    def qualify(self, p: str) -> str:
        """Absolute, scheme-qualified form of ``p`` (``file:/abs/path`` for local paths)."""
        return str(self._fs.makeQualified(self._path(p)).toString())

    def exists(self, p: str) -> bool:
        return bool(self._fs.exists(self._path(p)))

    def is_dir(self, p: str) -> bool:
        return bool(self._fs.getFileStatus(self._path(p)).isDirectory())

    def list_dirs(self, p: str) -> list[str]:
        return sorted(
            str(s.getPath().toString()) for s in self._fs.listStatus(self._path(p)) if s.isDirectory()
        )

    def list_files(self, p: str, recursive: bool) -> list[str]:
        out: list[str] = []
        it = self._fs.listFiles(self._path(p), recursive)
        while it.hasNext():
            out.append(str(it.next().getPath().toString()))
        return sorted(out)

    def mkdirs(self, p: str) -> None:
        self._fs.mkdirs(self._path(p))

    def rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._path(src), self._path(dst)):
            raise OSError(f"rename {src} -> {dst} failed")

    def delete(self, p: str) -> None:
        self._fs.delete(self._path(p), True)

    def write_bytes(self, p: str, data: bytes) -> None:
        stream = self._fs.create(self._path(p), True)
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()

    def read_bytes(self, p: str) -> bytes:
        stream = self._fs.open(self._path(p))
        try:
            return bytes(self._jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()
