"""The assistant: one conversation that chats, looks at images and draws. ``routing`` decides
where a message goes (rules, optionally the chat model); ``dispatch`` hands it there."""
