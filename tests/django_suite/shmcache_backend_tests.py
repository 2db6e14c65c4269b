"""Django's own cache backend test-suite (``BaseCacheTests`` from tests/cache/tests.py of
Django's source distribution) run against ``shmcache.django.ShmCache``, as Django runs it
against its own backends (compare its LocMemCacheTests and FileBasedCacheTests).

tests/test_django.py fetches Django's source, puts its ``cache`` test package on the path
and runs this module with Django's test runner in a subprocess. The segment's name comes
from $SHMCACHE_DJANGO_SUITE_LOCATION; that test removes it afterwards.
"""

import os
import unittest

from django.test import TestCase, override_settings

from cache.tests import BaseCacheTests, caches_setting_for_tests
from skips import SKIPPED

LOCATION = os.environ["SHMCACHE_DJANGO_SUITE_LOCATION"]


@override_settings(CACHES=caches_setting_for_tests(
    BACKEND="shmcache.django.ShmCache", LOCATION=LOCATION,
    OPTIONS={"memory": "16MiB", "max_item_size": "256KiB"}))
class ShmCacheBackendTests(BaseCacheTests, TestCase):
    pass


for _name, _reason in SKIPPED.items():
    setattr(ShmCacheBackendTests, _name,
            unittest.skip(_reason)(getattr(BaseCacheTests, _name)))
