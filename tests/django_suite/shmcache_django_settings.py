"""Settings for running Django's own cache backend tests against shmcache.django.ShmCache
(see tests/test_django.py, which runs them in a subprocess)."""

SECRET_KEY = "shmcache-django-suite"
INSTALLED_APPS = ["cache"]          # Django's tests/cache package, for its Poll model
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
