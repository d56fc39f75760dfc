"""What the `bioproxy` command prints once the server listens (as the original did).

Kept apart from cli.py: gunicorn's master imports it, and must not import requests.
"""


def _backends(settings):
    specs = settings.backends_list()
    if len(specs) == 1:
        return [f"  Backend llama.cpp:  {specs[0].url}"]
    return [f"  Backends llama.cpp: {len(specs)}"] + [f"    {s.name} -> {s.url}" for s in specs]


def banner(settings, chat_page=False):
    proxy = _url(settings.proxy_host, settings.proxy_port)
    admin = _url(settings.admin_host, settings.admin_port)
    lines = [
        "🚀 Starting bioproxy - llama.cpp reverse proxy with KV cache warmup",
        "",
        "Configuration:",
        f"  Proxy listening on: {proxy}",
        *_backends(settings),
        f"  Admin:              {admin}",
        f"  Warmup interval:    {settings.warmup_check_interval:g} s",
        f"  Templates:          {len(settings.prefixes)}",
    ]
    lines += [
        f"    {prefix} -> {path}" + (f" (model {model})" if model else "")
        for prefix, (path, model) in sorted(settings.templates().items())
    ]
    lines += [
        "",
        "✅ Proxy server is running!",
        "",
        "Try these commands:",
        f"  curl {proxy}/health",
        f"  curl {proxy}/v1/models",
        f"  curl {admin}/health",
        f"  curl {admin}/metrics",
        f"  curl {admin}/status",
    ]
    if settings.prefixes:
        prefix = sorted(settings.prefixes)[0]
        body = (
            '{"messages": [{"role": "user", "content": "' + prefix + ' Hello!"}], "max_tokens": 50}'
        )
        lines.append(
            f"  curl {proxy}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"
        )
    lines += [""]
    if chat_page:
        example = f" (try '{sorted(settings.prefixes)[0]} ...')" if settings.prefixes else ""
        lines.append(f"Chat in a browser:  {proxy}/{example}")
    lines += [f"Status page:        {admin}/", "", "Press Ctrl+C to stop..."]
    return "\n".join(lines)


def _url(host, port):
    # A wildcard address is not one to connect to: show the loopback one.
    host = {"0.0.0.0": "localhost", "::": "localhost", "": "localhost"}.get(host, host)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"
