"""The admin API (`/admin/*`): keys, live limits and shared health, behind the admin key.

Lives here: `api` (`AdminApp` and the reports the CLI prints too).

May import: `config`, the kernel (context, errors, runtime) and `proxy.state`. Never middlewares
or the CLI.
"""
