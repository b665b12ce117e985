"""Packaging for connmon: three flat modules, two commands, and the
SQLAlchemy entry points that make ``<driver>_connmon`` URLs and
``?plugin=connmon`` work."""

from setuptools import setup

# connmon.py imports only the standard library at module level, so it can
# name its own version and dialect entry points here.
from connmon import DIALECT_ENTRY_POINTS, __version__

setup(
    name="connmon",
    version=__version__,
    description="A top-like tool for the database connections of many "
                "SQLAlchemy processes and servers",
    long_description=open("README.txt", encoding="utf-8").read(),
    long_description_content_type="text/plain",
    license="MIT",
    python_requires=">=3.9",
    py_modules=["connmon", "connmon_server", "connmon_console"],
    install_requires=[],
    extras_require={
        "sqlalchemy": ["SQLAlchemy>=2.0"],
        "mysql": ["SQLAlchemy>=2.0", "PyMySQL"],
        "postgresql": ["SQLAlchemy>=2.0", "psycopg2-binary"],
        "test": ["SQLAlchemy>=2.0", "PyMySQL", "psycopg2-binary",
                 "psycopg[binary]", "pytest", "pyte", "hypothesis",
                 "prometheus_client", "oslo.db", "trustme", "gevent",
                 "eventlet", "aiomysql", "asyncpg", "gunicorn", "uWSGI",
                 "oslo.service", "celery", "mypy"],
    },
    entry_points={
        "console_scripts": [
            "connmond = connmon_server:main",
            "connmon = connmon_console:main",
        ],
        "sqlalchemy.dialects": [
            f"{name} = connmon:{attr}"
            for name, attr in DIALECT_ENTRY_POINTS.items()
        ],
        "sqlalchemy.plugins": ["connmon = connmon:ConnmonPlugin"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Database",
        "Topic :: System :: Monitoring",
    ],
)
