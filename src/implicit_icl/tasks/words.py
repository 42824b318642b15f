"""Words the procedure tasks are built from: 230 concrete English nouns, each one token after a space.

Being one token in SmolLM2's tokenizer (" apple" → [11977]) means a copied or recalled word is scored on the
whole word by first-token accuracy, not on a shared prefix.
"""

from __future__ import annotations

NOUNS: tuple[str, ...] = tuple(
    """
    apple bag ball bank basket beach bean bear bed bell belt bird blanket boat bone book bottle box bread brick
    bridge brush bus butter button cabin cable cake camera candle car card carpet castle cat chain chair cheese
    chicken church circle clock cloth cloud coat coffee coin computer cookie corn cotton cow crown cup desert desk
    diamond dinner dog doll door dragon dress drum duck egg engine eye face farm feather fence field finger fish
    flag floor flower forest fork frog fruit garden gate gift glass glove goat gold grass guitar hair hammer hat
    heart hill horse hotel house iron island jacket jungle kettle key king kitchen knife ladder lake lamp leaf lemon
    letter lion lunch map market meat metal milk mirror money monkey moon motor mountain mouse nail needle nest net
    nose ocean onion orange oven palace paper parrot pen pencil pepper piano picture pie pig pillow pipe plane
    planet plate pocket pond potato prize puzzle queen rabbit radio rain ribbon rice ring river road rock roof room
    rope saddle salt sand school sea sheep shell ship shirt shoe shop silver skirt sky snake snow soap sock soup
    spider spoon stamp star stone storm street sugar sun table tea teeth tent ticket tiger toe tomato tongue tooth
    towel tower town toy train tree truck valley village violin wagon wall wallet watch water whale wheel window
    wine wing wolf wood
    """.split()
)
