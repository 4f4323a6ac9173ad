"""A user's --middleware, as vLLM takes them: an ASGI class and an async http function."""


class TagMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-tag", b"class")]}
            await send(message)
        await self.app(scope, receive, tagged)


async def tag_function(request, call_next):
    response = await call_next(request)
    response.headers["x-tag-function"] = "yes"
    return response


NOT_MIDDLEWARE = 42
