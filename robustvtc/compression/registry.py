from ..registry import Registry

COMPRESSORS: Registry = Registry("compressor", group="robustvtc.compressors")
